"""Benchmarks run by ``python -m jobs.bench NAME``."""
