"""The Kubernetes manifests: core kinds validated strictly against the Kubernetes JSON schemas
that kubernetes-validate ships (offline); the Prometheus Operator CRDs (ServiceMonitor,
PrometheusRule) validated against the CRD-generated models of the PyPI package
cloudcoil-models-prometheus-operator, with a round trip that also rejects unknown fields; and the
generated ConfigMap and PrometheusRule compared with the dashboards and rules they come from."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.dashboards import grafana_json as gj

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
CORE_KINDS = {"Namespace", "DaemonSet", "Service", "ConfigMap"}


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


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(name for name, _ in manifests())
    assert {d["kind"] for _, d in manifests()} == CORE_KINDS | {"ServiceMonitor", "PrometheusRule"}


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
