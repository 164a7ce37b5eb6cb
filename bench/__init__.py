"""Benchmarks for excitor-kernels (``pytest bench/``); see bench/README.md."""
