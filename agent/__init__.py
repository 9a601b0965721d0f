"""The per-node agent: GPU sources, the telemetry pipeline, the control API and the CLI."""
