"""Benchmark: cost of an attack iteration relative to a plain training step, per variant."""
