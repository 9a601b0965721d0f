# Two commands do all set-up: `make demo` runs the simulated GB300 NVL72 rack, `make test`
# installs everything the tests need (virtualenv, Python packages, Debian's prometheus, Slurm and
# munge) and runs them.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of PyTorch for the `hf` engine tests; a plain `torch` would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck unit install install-dev prometheus slurm dashboards clean

$(VENV)/.core: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core pyproject.toml
	$(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q -e '.[dev,torch,grafana]'
	@# grafana-client pulls in urllib3-future, whose start-up hook replaces urllib3 in the whole
	@# environment and breaks requests-based tools (schemathesis); keep the real urllib3.
	rm -f $(VENV)/lib/python*/site-packages/urllib3_future.pth
	$(PIP) install -q --force-reinstall --no-deps urllib3
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The rack task tests start a one-machine Slurm cluster of their own (tests/rack/slurm_cluster.py);
# only the programs are needed, Debian's services stay off.
slurm:
	@command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v srun >/dev/null 2>&1 \
	  && command -v munged >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends slurmctld slurmd munge >/dev/null; }

demo: $(VENV)/.core
	$(VENV)/bin/rackscope demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit: $(VENV)/.dev prometheus slurm
	$(VENV)/bin/pytest -q

test: lint unit

dashboards: $(VENV)/.dev
	$(VENV)/bin/rackscope dashboards build

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
