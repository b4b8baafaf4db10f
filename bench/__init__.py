"""Benchmarks and the soak test, run against real service processes on loopback."""
