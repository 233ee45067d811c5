"""Benchmarks of explainers: localisation against ground truth, timing, tables."""
