# The rackscope agent image: `rackscope agent ...` with the simulated, NVML and DCGM sources.
# NVML comes from the host driver, which the NVIDIA Container Toolkit mounts in when the
# container runs with GPUs (docker run --gpus all, compose `gpus: all`, Kubernetes runtime
# class nvidia); without it the agent runs the simulated source.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies first, so code edits do not reinstall them: install the project's declared
# dependencies from pyproject.toml with a stub package, then the real sources. rackscope/agent,
# rackscope/runner, ... are links to the top-level folders, copied beside it; the wheel holds
# the one `rackscope` package.
COPY pyproject.toml README.md ./
RUN mkdir -p rackscope \
    && touch rackscope/__init__.py \
    && pip install . \
    && pip uninstall -y rackscope
COPY rackscope ./rackscope
COPY agent ./agent
COPY runner ./runner
COPY rack ./rack
COPY dashboards ./dashboards
RUN pip install --no-deps . \
    && useradd --system --create-home --uid 10001 rackscope \
    && rm -rf /src

USER rackscope
WORKDIR /home/rackscope
# 9464: Prometheus /metrics; 9470: control API
EXPOSE 9464 9470
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9470/healthz', timeout=3)"]
ENTRYPOINT ["rackscope"]
CMD ["agent", "--help"]
