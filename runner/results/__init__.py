"""Run results, one module per concern (see docs/results-schema.md); import from the module:

- ``stats``: percentiles and latency distributions over plain numbers.
- ``window``: a measured window (``Phase``) and what it adds up to: the summary, server
  validity and goodput, per-GPU and per-node totals.
- ``series``: the 1 s throughput, request and power time series of a window.
- ``record``: the ``rackscope.run/1`` record: schema constants, ``RunResult``, per-request rows.
- ``io``: writing a run (rows first, then the record naming them by count and digest) and
  loading records and rows, refusing a record and rows that do not belong together.
"""
