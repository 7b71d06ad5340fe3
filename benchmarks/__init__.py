"""Performance measurements: each module prints a table and writes JSON to ``benchmarks/results/``.

``make bench`` (``python -m benchmarks.run_all``) runs them all and writes ``results/summary.json``.
Speed is measured here, never asserted in tests.
"""
