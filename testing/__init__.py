"""Test support shared by the tests and the benchmarks, never shipped: the fake upstream and the process helpers."""
