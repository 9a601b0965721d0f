"""Operator side: rack runs across many agents, results bundles, the one-process demo."""
