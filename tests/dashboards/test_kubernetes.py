"""The Kubernetes manifests: core kinds validated strictly against the Kubernetes JSON schemas
that kubernetes-validate ships (offline); the Prometheus Operator CRDs (ServiceMonitor,
PrometheusRule) validated against the CRD-generated models of the PyPI package
cloudcoil-models-prometheus-operator, with a round trip that also rejects unknown fields; the
generated ConfigMap and PrometheusRule compared with the dashboards and rules they come from;
and the rack run's Indexed Job checked against the command it runs (our own CLI parser and
identity rules, with the values Kubernetes substitutes)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from rackscope.cli import build_parser
from rackscope.rack.cli import collect_main
from rackscope.rack.identity import resolve_identity
from rackscope.rack.task import rack_settings_of, run_task
from tests.dashboards import grafana_json as gj

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
CORE_KINDS = {"Namespace", "DaemonSet", "Service", "ConfigMap", "Job", "PersistentVolumeClaim"}
# Applied one run at a time, by hand: `kubectl apply -k` must not start a benchmark.
ON_DEMAND = {"rack-job.yaml", "rack-collect.yaml"}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("generated/*.yaml")]):
        if path.name == "kustomization.yaml":
            continue
        out += [(str(path.relative_to(K8S)), doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in manifests() if d["kind"] == kind]
    return doc


def test_kustomization_lists_every_manifest_but_the_rack_run() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted({name for name, _ in manifests()} - ON_DEMAND)
    assert {d["kind"] for n, d in manifests() if n not in ON_DEMAND} == (
        CORE_KINDS - {"Job", "PersistentVolumeClaim"} | {"ServiceMonitor", "PrometheusRule"})
    assert {d["kind"] for n, d in manifests() if n in ON_DEMAND} == {"Job", "PersistentVolumeClaim"}


@pytest.mark.parametrize(("name", "doc"), [(n, d) for n, d in manifests() if d["kind"] in CORE_KINDS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_core_manifests_validate_strictly(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_validation_is_not_vacuous() -> None:
    ds = yaml.safe_load((K8S / "daemonset.yaml").read_text())
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy2"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def _crd_roundtrip(kind: str, doc: dict[str, Any]) -> None:
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, kind).model_validate(doc)  # types, enums, required fields
    # The models ignore unknown keys; a lossless round trip shows there were none.
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ServiceMonitor", "PrometheusRule"])
def test_prometheus_operator_resources_match_the_crd_schemas(kind: str) -> None:
    _crd_roundtrip(kind, by_kind(kind))


def test_crd_check_catches_a_misspelt_field() -> None:
    from pydantic import ValidationError

    doc = by_kind("ServiceMonitor")
    doc["spec"]["endpoints"][0]["intervall"] = doc["spec"]["endpoints"][0].pop("interval")
    with pytest.raises(AssertionError):
        _crd_roundtrip("ServiceMonitor", doc)
    doc = by_kind("ServiceMonitor")
    doc["spec"]["endpoints"][0]["port"] = 9464  # a port *name* is a string
    with pytest.raises(ValidationError):
        _crd_roundtrip("ServiceMonitor", doc)


def test_daemonset_runs_the_nvml_agent_on_gpu_nodes() -> None:
    ds = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:3] == ["agent", "--source", "nvml"]
    assert "--workload" not in args
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    env = {e["name"]: e for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["RACKSCOPE_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "secretKeyRef" in env["RACKSCOPE_API_TOKEN"]["valueFrom"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9464, "api": 9470}
    service = by_kind("Service")
    monitor = by_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # The target-down alert watches jobs named rackscope*; the operator names the job after the Service.
    assert service["metadata"]["name"].startswith("rackscope")


def test_dashboard_configmap_is_the_generated_dashboards() -> None:
    cm = by_kind("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {f"rackscope-{name}": (gj.GENERATED / name).read_text() for name in gj.DASHBOARD_FILES}


def test_prometheusrule_is_the_rule_files(tmp_path: Path) -> None:
    rule = by_kind("PrometheusRule")
    rules_dir = ROOT / "dashboards" / "rules"
    expected = [g for f in ("rackscope.rules.yml", "baselines.yml")
                for g in yaml.safe_load((rules_dir / f).read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
    path = tmp_path / "from-prometheusrule.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(["/usr/bin/promtool", "check", "rules", str(path)], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the rack run: an Indexed Job of `rackscope rack task`, then `rackscope rack collect` -----------
def _doc(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for n, d in manifests() if n == name and d["kind"] == kind]
    return doc


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _pod_env(job: dict[str, Any], *, node: str, host_ip: str, index: int) -> dict[str, str]:
    """The environment Kubernetes gives the task's container on a node: literal values, the
    downward-API fields the manifest names, and the completion index of an Indexed Job."""
    fields = {"spec.nodeName": node, "status.hostIP": host_ip,
              "metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"]}
    env = {}
    for var in _container(job)["env"]:
        env[var["name"]] = var["value"] if "value" in var else fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    assert job["spec"]["completionMode"] == "Indexed"  # what makes the controller set the index
    return {**env, "JOB_COMPLETION_INDEX": str(index)}


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """``$(VAR)`` as the kubelet expands it; every reference must be defined (an undefined
    one would stay literal text in the command)."""
    used = {m for a in args for m in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a)}
    assert used <= env.keys(), used - env.keys()
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], a) for a in args]


def test_rack_job_is_indexed_with_every_task_at_once_one_per_node() -> None:
    job = _doc("rack-job.yaml", "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == 18
    assert spec["backoffLimitPerIndex"] == 0 and pod["restartPolicy"] == "Never"  # a retry would meet a taken rank
    (rule,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert rule["topologyKey"] == "kubernetes.io/hostname"
    assert rule["labelSelector"]["matchLabels"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert pod["nodeSelector"]["rackscope.io/rack"] == _pod_env(job, node="n", host_ip="h", index=0)["RACKSCOPE_RACK"]


def test_rack_job_runs_a_task_our_cli_takes_with_the_index_as_rank() -> None:
    job = _doc("rack-job.yaml", "Job")
    env = _pod_env(job, node="gpu-node-07", host_ip="10.1.2.7", index=6)
    argv = _expand(_container(job)["args"], env)
    args = build_parser().parse_args(argv)
    assert args.func is run_task
    assert "--rank" not in argv and "RACKSCOPE_RANK" not in env  # the rank is the completion index
    assert args.tasks == job["spec"]["completions"]
    me = resolve_identity(env, rank=args.rank, tasks=args.tasks, node=args.node, rack=args.rack, run_id=args.run_id,
                          node_from=args.node_from)
    assert (me.rank, me.tasks, me.node, me.rack, me.run_id, me.scheduler) == (
        6, 18, "gpu-node-07", "r1", "rackscope-rack-r1", "kubernetes")
    assert me.sources["rank"] == "JOB_COMPLETION_INDEX"
    assert args.results == f"/results/{me.run_id}"
    assert (args.engine, args.url) == ("openai", "http://10.1.2.7:8000")
    # The workload flags make a valid run config, as the task builds it.
    from rackscope.runner.cli import config_from_args

    args.rack, args.node, args.run_id = me.rack, me.node, me.run_id
    config = config_from_args(args, env={})
    assert (config.scenario, config.duration_s, config.node) == ("offline", 600.0, "gpu-node-07")
    # Another pod, on another node: its own server, and the same settings at the barrier.
    other = build_parser().parse_args(_expand(_container(job)["args"],
                                              _pod_env(job, node="gpu-node-08", host_ip="10.1.2.8", index=7)))
    other.rack, other.node, other.run_id = me.rack, "gpu-node-08", me.run_id
    other_config = config_from_args(other, env={})
    assert other_config.url != config.url
    assert rack_settings_of(other_config) == rack_settings_of(config)


def test_rack_results_volume_is_shared_and_collect_reads_the_runs_folder() -> None:
    claim = _doc("rack-job.yaml", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node's pod writes into it
    job, collect = _doc("rack-job.yaml", "Job"), _doc("rack-collect.yaml", "Job")
    for j in (job, collect):
        (volume,) = [v for v in j["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        (mount,) = [m for m in _container(j)["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == "/results"
    task = build_parser().parse_args(_expand(_container(job)["args"], _pod_env(job, node="n", host_ip="h", index=0)))
    args = build_parser().parse_args(_container(collect)["args"])
    assert args.func is collect_main
    assert args.folder == task.results


def test_rack_job_validation_is_not_vacuous() -> None:
    job = _doc("rack-job.yaml", "Job")
    job["spec"]["parallelizm"] = job["spec"].pop("parallelism")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
