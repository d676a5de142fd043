"""Benchmarks of dino_keras training (outside the library): see benchmarks/benchmark.py."""
