"""Benchmarks of revdeq_jax: `python -m benchmarks.adjoints` compares the adjoints."""
