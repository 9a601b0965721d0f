"""The rack record: per-node entries from what the coordinator knows, and the record's states."""

from __future__ import annotations

from rackscope.rack.record import SCHEMA, NodeRun, assemble_record, exit_code, node_entry


def test_node_entry_reads_the_record_summary() -> None:
    n = NodeRun(agent="http://x:1", key="n07", status="completed")
    n.identity = {
        "node": "n07",
        "rack": "r9",
        "gpus": 4,
        "gpu_model": "NVIDIA GB300",
        "simulated": True,
        "source": "sim",
    }
    n.view = {"run_id": "abc", "status": "completed", "started_at": 5.0, "ended_at": 15.0}
    n.record = {
        "summary": {
            "complete": True,
            "gpus": 4,
            "duration_s": 10.0,
            "output_tokens": 600_000,
            "output_tokens_per_s": 60_000.0,
            "energy_j": 52_000.0,
            "average_power_w": 5_200.0,
            "output_tokens_per_j": 600_000 / 52_000.0,
            "requests_completed": 2_000,
            "requests_failed": 1,
        }
    }
    e = node_entry(n)
    assert (e["node"], e["rack"], e["run_id"], e["gpus"], e["status"]) == ("n07", "r9", "abc", 4, "completed")
    assert e["output_tokens_per_s"] == 60_000.0
    assert e["power_w"] == 5_200.0
    assert e["complete"] is True


def test_record_state_controls_completeness() -> None:
    n = NodeRun(agent="http://x:1", key="n01", status="completed", identity={"node": "n01", "gpus": 1})
    n.record = {"summary": {"complete": True, "output_tokens_per_s": 1.0, "gpus": 1}}
    done = assemble_record([n], rack_run_id="r", run={"engine": "sim"}, agents=["http://x:1"])
    assert done["schema"] == SCHEMA
    assert done["summary"]["complete"] is True
    assert done["config"] == {"engine": "sim", "agents": ["http://x:1"]}
    assert (done["state"], done["error"], exit_code(done)) == ("finished", None, 0)
    for state in ("running", "interrupted", "failed"):
        rec = assemble_record([n], rack_run_id="r", run={}, agents=["http://x:1"], state=state)
        assert rec["summary"]["complete"] is False
        assert rec["state"] == state


def test_node_entry_counts_the_gpus_the_agent_lists_and_hides_credentials() -> None:
    n = NodeRun(agent="http://ops:hunter2@x:1", key="n01", status="failed", error="boom")
    n.identity = {"node": "n01", "rack": "r", "gpus": [{"index": 0}, {"index": 1}]}
    e = node_entry(n)
    assert e["gpus"] == 2
    assert e["agent"] == "http://***@x:1"
    assert e["complete"] is False
    rec = assemble_record(
        [n], rack_run_id="r", run={}, agents=[n.agent], state="failed", error="the coordinator failed"
    )
    assert rec["config"]["agents"] == ["http://***@x:1"]
    assert rec["summary"]["failed_nodes"][0]["agent"] == "http://***@x:1"
    assert (rec["state"], rec["error"]) == ("failed", "the coordinator failed")
    assert exit_code(rec) == 1


def test_the_record_never_stores_the_run_bodys_secrets() -> None:
    n = NodeRun(agent="http://x:1", key="n01", status="completed", identity={"node": "n01", "gpus": 1})
    run = {"engine": "openai", "url": "http://ops:hunter2@server:8000/v1", "api_key": "sk-live-123456", "model": "m"}
    rec = assemble_record([n], rack_run_id="r", run=run, agents=["http://x:1"])
    assert rec["config"] == {
        "engine": "openai",
        "url": "http://***@server:8000/v1",
        "api_key_set": True,
        "model": "m",
        "agents": ["http://x:1"],
    }
    assert "hunter2" not in str(rec) and "sk-live" not in str(rec)
