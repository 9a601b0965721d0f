"""The shipped dcgm-exporter counters file against the fields the dcgm source reads."""

from __future__ import annotations

import csv
from pathlib import Path

import kubernetes_validate  # type: ignore[import-untyped]
import yaml

from rackscope.agent.sources import dcgm

ROOT = Path(__file__).resolve().parents[3]
COUNTERS = ROOT / dcgm.COUNTERS_CSV
CONFIGMAP_DIR = ROOT / "deploy" / "kubernetes" / "dcgm-exporter"
# Read when a page has them, but not asked for: older names of the same field, or coarser
# stand-ins for a field the file enables.
FALLBACKS = {
    dcgm.CLOCK_THROTTLE_REASONS: "the name of CLOCKS_EVENT_REASONS before DCGM 3.3",
    dcgm.POWER_LIMIT: "the configured limit, when the enforced one is missing",
    dcgm.NVLINK_TOTAL: "tx + rx in one number, when the per-direction fields are missing",
    dcgm.PCIE_TX_LEGACY: "deprecated NVML throughput, when the profiling field is missing",
    dcgm.PCIE_RX_LEGACY: "deprecated NVML throughput, when the profiling field is missing",
    dcgm.FB_TOTAL: "used + free + reserved gives the same total",
}


def rows() -> list[list[str]]:
    lines = [line for line in COUNTERS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [[cell.strip() for cell in row] for row in csv.reader(lines)]


def test_rows_have_dcgm_exporters_three_columns() -> None:
    for row in rows():
        assert len(row) == 3, row
        name, kind, help_text = row
        assert name.startswith("DCGM_FI_"), row
        assert kind in ("gauge", "counter"), row
        assert help_text, row


def test_the_file_enables_every_field_the_source_asks_for_and_nothing_else() -> None:
    names = [row[0] for row in rows()]
    assert len(names) == len(set(names))
    assert set(names) == {choices[0] for choices in dcgm.EXPECTED}
    # Vice versa: every field the source reads is in the file or is a known fallback of one.
    assert set(names) | FALLBACKS.keys() == dcgm.FIELDS
    assert not set(names) & FALLBACKS.keys()


def test_counters_since_driver_load_are_declared_counters() -> None:
    kinds = {row[0]: row[1] for row in rows()}
    counters = {dcgm.ENERGY, dcgm.ECC_SBE, dcgm.ECC_DBE, *dcgm.NVLINK_ERRORS}
    assert {name for name, kind in kinds.items() if kind == "counter"} == counters


def test_the_gpu_operator_configmap_carries_the_file_verbatim_and_validates() -> None:
    kustomization = yaml.safe_load((CONFIGMAP_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["rackscope-counters.yaml"]
    (doc,) = [d for d in yaml.safe_load_all((CONFIGMAP_DIR / "rackscope-counters.yaml").read_text()) if d]
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    assert doc["kind"] == "ConfigMap"
    assert doc["metadata"]["namespace"] == "gpu-operator"
    # The operator mounts this key at /etc/dcgm-exporter/dcgm-metrics.csv (DCGM_EXPORTER_COLLECTORS).
    assert doc["data"] == {"dcgm-metrics.csv": COUNTERS.read_text()}
