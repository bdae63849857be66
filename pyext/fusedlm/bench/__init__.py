"""Benchmark harness shared by `benchmarks/` and `fusedlm bench`."""
from .harness import environment, time_ms, write_json

__all__ = ["environment", "time_ms", "write_json"]
