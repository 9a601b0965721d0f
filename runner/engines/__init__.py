"""Engines: the things a workload sends requests to."""
