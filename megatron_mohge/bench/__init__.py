"""Benchmarks: layer microbenchmark, end-to-end comparison, report."""
