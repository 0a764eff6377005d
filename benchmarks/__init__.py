"""Spillway benchmarks: `make bench` runs every `bench_*.py` module here (never as tests)."""
