"""Grafana dashboards as code, Prometheus rules and Grafana provisioning for rackscope.

The dashboards are built with grafana-foundation-sdk (dev extra, pinned to its Grafana 11.6
build) into ``dashboards/generated``; ``rackscope dashboards build|check|push`` regenerate,
verify and upload them. Only metric names come from the runtime (``rackscope.contract``).
"""
