"""Benchmark workloads: engines, scenarios, datasets, results and comparison.

The runner never imports the agent: a workload runs with or without one. It records
metrics through the OpenTelemetry API only, which is a no-op until someone installs an SDK.
"""
