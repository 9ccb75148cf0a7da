"""CIFAR-10 image classification with single- and multi-scale RevDEQ (issue 4).

Entry points: `python -m experiments.vision.train`, `python -m experiments.vision.evaluate`,
`python -m experiments.vision.compare`. See `experiments/vision/README.md`.
"""
