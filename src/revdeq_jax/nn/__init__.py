"""Equinox building blocks for deep equilibrium models."""

from ._deq import DEQ as DEQ
