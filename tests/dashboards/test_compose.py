"""The docker compose demo stack, checked offline (no Docker engine here): the compose file
against the compose-spec schema, the collector, Prometheus and Alertmanager configs against
each other and the rules, the agent Dockerfile."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rackscope.dashboards import provisioning

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
CHECK_JSONSCHEMA = str(Path(sys.executable).parent / "check-jsonschema")


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / name).read_text())
    return doc


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(path)],
                          check=False, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    result = check_compose(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The schema does reject a mistake (a misspelt key in the agent template).
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((ROOT / "docker-compose.yml").read_text().replace("  restart: unless-stopped\n",
                                                                     "  restart_policy: unless-stopped\n", 1))
    assert check_compose(bad).returncode != 0


def agent_services() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in compose()["services"].items() if k.startswith("node-")}


def flags(command: list[str]) -> dict[str, str]:
    return {command[i]: command[i + 1] for i in range(1, len(command) - 1) if command[i].startswith("--")}


def test_eighteen_simulated_gb300_nodes_form_rack_r1() -> None:
    agents = agent_services()
    assert len(agents) == 18
    nodes = []
    for service in agents.values():
        cmd = service["command"]
        assert cmd[0] == "agent"
        f = flags(cmd)
        assert f["--source"] == "sim"
        assert f["--gpu-model"] == "gb300"
        assert f["--gpus"] == "4"
        assert f["--rack"] == "r1"
        assert f["--workload"] == "offline"
        assert f["--otlp-endpoint"] == "http://otel-collector:4318"
        assert f["--api-host"] == "0.0.0.0"
        # Off loopback a token is mandatory; it comes from the environment, never the visible command line.
        assert "--api-token" not in f
        assert service["environment"]["RACKSCOPE_API_TOKEN"].startswith("${RACKSCOPE_API_TOKEN")
        assert f["--metrics-host"] == "0.0.0.0"
        assert service["healthcheck"]["test"][0] == "CMD"
        assert service["build"]["dockerfile"] == "Dockerfile"
        nodes.append(f["--node"])
    assert nodes == [f"n{i:02d}" for i in range(1, 19)]


def test_images_are_pinned_and_services_have_healthchecks() -> None:
    services = compose()["services"]
    for name, service in services.items():
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: unpinned image {image}"
        if name != "otel-collector":  # FROM scratch: nothing inside to run a check with
            assert "healthcheck" in service, name
    assert services["grafana"]["image"].startswith("grafana/grafana:11.6.")  # the SDK build's Grafana
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")


def test_gpu_profile_runs_an_nvml_agent() -> None:
    gpu = compose()["services"]["agent-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert "gpus" not in gpu
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    f = flags(gpu["command"])
    assert f["--source"] == "nvml"
    assert "--workload" not in f


def test_grafana_gets_anonymous_viewers_and_the_provisioning() -> None:
    grafana = compose()["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert mounts["/etc/grafana/provisioning/datasources"] == "./dashboards/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./dashboards/provisioning/dashboards"
    assert mounts[provisioning.DASHBOARDS_PATH] == "./dashboards/generated"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "dashboards" / "generated" / Path(home).name).is_file()
    for source in mounts.values():
        assert (ROOT / source).is_dir(), source
    datasources = yaml.safe_load((ROOT / "dashboards/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasources["datasources"][0]["jsonData"]["timeInterval"] == load("prometheus.yml")["global"][
        "scrape_interval"]


def test_collector_config_is_wired_and_keeps_contract_names() -> None:
    config = load("otel-collector.yaml")
    pipeline = config["service"]["pipelines"]["metrics"]
    for kind in ("receivers", "processors", "exporters"):
        for component in pipeline[kind]:
            assert component in config[kind], f"{kind} {component} is used but not defined"
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    otlp = config["receivers"]["otlp"]["protocols"]
    assert otlp["http"]["endpoint"].endswith(":4318")
    assert otlp["grpc"]["endpoint"].endswith(":4317")
    exporter = config["exporters"]["prometheus"]
    # The default translation adds unit suffixes and _total (the contract's names); nothing here
    # may switch it off.
    assert exporter.get("add_metric_suffixes", True) is True
    assert exporter.get("translation_strategy", "UnderscoreEscapingWithSuffixes") in {
        "UnderscoreEscapingWithSuffixes", "NoUTF8EscapingWithSuffixes"}
    assert not exporter.get("resource_to_telemetry_conversion", {}).get("enabled", False)
    port = exporter["endpoint"].rsplit(":", 1)[1]
    (job,) = [j for j in load("prometheus.yml")["scrape_configs"] if j["job_name"] == "rackscope-collector"]
    assert job["static_configs"][0]["targets"] == [f"otel-collector:{port}"]
    assert job["honor_labels"] is True


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-direct.yml"])
def test_prometheus_configs_pass_promtool_and_load_the_rules(name: str) -> None:
    result = subprocess.run(["/usr/bin/promtool", "check", "config", str(COMPOSE_DIR / name)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config = load(name)
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert "./dashboards/rules:/etc/prometheus/rules:ro" in compose()["services"]["prometheus"]["volumes"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert all(j["job_name"].startswith("rackscope") or j["job_name"] == "prometheus"
               for j in config["scrape_configs"])


def test_direct_scrape_alternative_scrapes_every_agent() -> None:
    (job,) = [j for j in load("prometheus-direct.yml")["scrape_configs"] if j["job_name"] == "rackscope-agents"]
    assert sorted(job["static_configs"][0]["targets"]) == sorted(f"{s}:9464" for s in agent_services())
    volume = compose()["services"]["prometheus"]["volumes"][0]
    assert volume.startswith("./deploy/compose/${RACKSCOPE_PROMETHEUS_CONFIG:-prometheus.yml}:")
    (gpu_job,) = [j for j in load("prometheus-direct.yml")["scrape_configs"] if j["job_name"] == "rackscope-gpu-agent"]
    assert gpu_job["static_configs"][0]["targets"] == ["agent-gpu:9464"]


def test_documented_gpu_commands_start_the_real_node_without_the_simulated_rack() -> None:
    # `docker compose --profile gpu up` alone would start the 18 simulated nodes too, mixing real
    # and simulated data in one rack: every documented GPU command names its services.
    services = set(compose()["services"])
    simulated = set(agent_services())
    texts = [ROOT / "README.md", ROOT / "docker-compose.yml", *sorted((ROOT / "docs").glob("*.md"))]
    commands = []
    for path in texts:
        joined = re.sub(r"`?\s*\n\s*#?\s*`?", " ", path.read_text())  # commands wrapped over lines
        commands += re.findall(r"docker compose --profile gpu up(?: -d)?((?: [a-z][\w-]*)*)", joined)
    assert len(commands) >= 2
    for named in commands:
        words = named.split()
        names = set(itertools.takewhile(lambda w: w in services, words))  # the prose after it is not a service
        assert "agent-gpu" in names, named
        assert not names & simulated, named


def test_alertmanager_routes_and_inhibitions_name_real_alerts() -> None:
    config = load("alertmanager.yml")
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    assert all(r["receiver"] in receivers for r in config["route"]["routes"])
    rules = yaml.safe_load((ROOT / "dashboards" / "rules" / "rackscope.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    for inhibit in config["inhibit_rules"]:
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            for alert in re.search(r'"(.*)"', matcher).group(1).split("|"):  # type: ignore[union-attr]
                assert alert in alerts


def test_dockerfile_builds_the_agent_image_from_python_slim() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim", text, re.M)
    assert 'ENTRYPOINT ["rackscope"]' in text
    assert "pip install" in text
    assert "USER rackscope" in text
    # Every folder the `rackscope` namespace links to must reach the build context and the image,
    # or the wheel built there silently lacks that room.
    linked = {p.name for p in (ROOT / "rackscope").iterdir() if p.is_symlink()}
    assert linked == {"agent", "runner", "rack", "dashboards"}
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!rackscope/", *(f"!{name}/" for name in linked)):
        assert needed in ignore
    copied = re.findall(r"^COPY (\S+)", text, re.M)
    assert {"rackscope", "pyproject.toml", *linked} <= set(copied)




# --- every rackscope command in the file, through the real command-line parsers -------------------
IMAGE = "rackscope-agent:0.1.0"
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def substituted(value: str, env: dict[str, str]) -> str:
    """``${NAME:-default}`` as compose fills it in from ``env``."""
    return _DEFAULTED.sub(lambda m: env.get(m.group(1)) or m.group(2), value)


def rackscope_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if s["image"] == IMAGE}


def parsed(service: dict[str, Any]) -> Any:
    """The service's command as ``rackscope`` parses and checks it, with its compose environment."""
    from rackscope.cli import build_parser

    env = {k: substituted(str(v), {}) for k, v in (service.get("environment") or {}).items()}
    argv = [substituted(str(word), {}) for word in service["command"]]
    args = build_parser().parse_args(argv)  # exits 2 on a flag the command does not have
    if args.command == "agent":
        from rackscope.agent.cli import settings_from_args

        return settings_from_args(args, env=env)
    if args.command == "run":
        from rackscope.runner.cli import config_from_args

        return config_from_args(args, env=env)
    return args


def test_every_rackscope_command_parses_with_the_real_command_line() -> None:
    services = rackscope_services()
    assert {"serve-sim", "loadgen", "engine-node", "agent-gpu"} | set(agent_services()) == set(services)
    for name, service in services.items():
        result = parsed(service)
        assert result is not None, name


def test_every_published_port_is_on_loopback_and_used_once() -> None:
    published = []
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this host"
            published.append((int(host_port), name))
            assert container_port.isdigit()
    ports = [p for p, _ in published]
    assert len(ports) == len(set(ports)), sorted(published)


def test_only_the_gpu_agent_needs_a_profile() -> None:
    profiles = {name: s.get("profiles") for name, s in compose()["services"].items() if s.get("profiles")}
    assert profiles == {"agent-gpu": ["gpu"]}  # the demo, serve-sim and its node start with `up`


def test_the_engine_node_reads_the_served_page_while_loadgen_keeps_it_busy() -> None:
    services = compose()["services"]
    server = parsed(services["serve-sim"])
    assert (server.host, server.gpu_model, server.gpus) == ("0.0.0.0", "gb300", 4)
    assert server.gpus >= 1 and 0 < server.port < 65536
    assert services["serve-sim"]["ports"] == [f"127.0.0.1:{server.port}:{server.port}"]
    assert f"127.0.0.1:{server.port}/health" in " ".join(services["serve-sim"]["healthcheck"]["test"])
    page = f"http://serve-sim:{server.port}/metrics"

    node = parsed(services["engine-node"])
    assert node.engine_metrics_url == page
    assert node.engine_metrics_format is None  # told apart from the page itself
    assert services["engine-node"]["depends_on"]["serve-sim"] == {"condition": "service_healthy"}
    assert services["engine-node"]["depends_on"]["otel-collector"] == {"condition": "service_started"}
    assert (node.rack, node.node, node.otlp_endpoint) == ("serving", "s01", "http://otel-collector:4318")
    # Kept out of the simulated rack: r1's totals, medians and alerts are its 18 nodes' alone.
    assert node.rack not in {flags(s["command"])["--rack"] for s in agent_services().values()}

    run = parsed(services["loadgen"])
    assert (run.engine, run.url, run.scenario) == ("openai", f"http://serve-sim:{server.port}", "concurrency")
    assert run.duration_s is not None and run.concurrency is not None
    assert (run.rack, run.node) == (node.rack, node.node)
    # It reads the same page into its own record (the default: the server's origin + /metrics).
    from rackscope.runner.server_view import page_url

    assert page_url(run) == page
    # And exports nothing: the client's tokens would otherwise join the dashboards' totals.
    assert "--otlp-endpoint" not in services["loadgen"]["command"]
    assert services["loadgen"]["depends_on"] == {"serve-sim": {"condition": "service_healthy"}}
    assert f"serve-sim:{server.port}/health" in " ".join(services["loadgen"]["healthcheck"]["test"])
    # The direct-scrape variant scrapes the engine node too.
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in load("prometheus-direct.yml")["scrape_configs"]}
    assert jobs["rackscope-engine-node"] == ["engine-node:9464"]


def test_a_command_with_a_bad_engine_page_is_refused() -> None:
    # The checks above would catch a mistyped page: the agent's own settings refuse it.
    from rackscope.errors import ConfigError

    service = dict(compose()["services"]["engine-node"])
    service["command"] = [w if w != "http://serve-sim:8000/metrics" else "serve-sim:8000/metrics"
                          for w in service["command"]]
    with pytest.raises(ConfigError, match="--engine-metrics must be an http"):
        parsed(service)
