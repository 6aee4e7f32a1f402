"""Benchmarks, each run as a module (`python -m bench.model_bench`), each figure printed next to
a baseline measured in the same run. `--smoke` runs any of them in seconds with the smallest
sizes, which is how the test suite keeps them working (its figures mean nothing)."""
