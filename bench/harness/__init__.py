"""The benchmark harness behind bench/run (see docs/benchmarks.md)."""
