"""Benchmarks and the demo: data generation, accuracy tables, speed and load measurements."""
