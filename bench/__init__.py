"""Benchmarks for keyedpool: side-by-side comparisons and micro-costs.

* ``python -m bench.compare [--quick]``: every design, every workload, one run.
* ``pytest bench/ --benchmark-only``: micro-costs with pytest-benchmark.

Nothing here is part of the installed ``keyedpool`` package.
"""
