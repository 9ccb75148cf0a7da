"""Experiments reproducing the RevDEQ paper (shared code: `experiments.common`)."""
