"""Peers that misbehave on purpose: what rackscope must refuse, bound or survive."""
