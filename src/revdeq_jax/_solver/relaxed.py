"""Relaxed (damped) fixed-point iteration and its undamped special case, Picard."""

from typing import ClassVar

import equinox as eqx
from jaxtyping import PyTree

from .._custom_types import Args, Fn, Z
from .._misc import tree_combine_lin
from .base import AbstractSolver


class IterateState(eqx.Module):
    z: PyTree
    fz: PyTree


def _relaxed_step(beta: float, fn: Fn, state: IterateState, args: Args) -> IterateState:
    z = state.fz if beta == 1 else tree_combine_lin(1 - beta, state.z, beta, state.fz)
    return IterateState(z=z, fz=fn(z, args))


class Relaxed(AbstractSolver[IterateState]):
    r"""Relaxed fixed-point iteration $z_{n+1} = (1 - \beta) z_n + \beta f(z_n)$.

    One evaluation of $f$ per step. Converges linearly for a contraction with constant
    $k$ when $0 < \beta < 2/(k+1)$. Not reversible: differentiate it with
    [`revdeq_jax.UnrolledAdjoint`][], [`revdeq_jax.CheckpointAdjoint`][] or
    [`revdeq_jax.ImplicitAdjoint`][].
    """

    beta: float = 1.0

    nfe_per_step: ClassVar[int] = 1

    def __check_init__(self):
        if not 0 < self.beta < 2:
            raise ValueError(f"`Relaxed(beta={self.beta})`: `beta` must lie in (0, 2).")

    def init(self, fn: Fn, z0: Z, args: Args) -> IterateState:
        return IterateState(z=z0, fz=fn(z0, args))

    def step(self, fn: Fn, state: IterateState, args: Args) -> IterateState:
        return _relaxed_step(self.beta, fn, state, args)

    def current(self, state: IterateState) -> tuple[Z, Z]:
        return state.z, state.fz


class Picard(AbstractSolver[IterateState]):
    r"""Plain fixed-point (Picard) iteration $z_{n+1} = f(z_n)$.

    The simplest solver, and the forward pass of an explicit weight-tied network. Often
    slow; see [`revdeq_jax.Anderson`][].
    """

    nfe_per_step: ClassVar[int] = 1

    def init(self, fn: Fn, z0: Z, args: Args) -> IterateState:
        return IterateState(z=z0, fz=fn(z0, args))

    def step(self, fn: Fn, state: IterateState, args: Args) -> IterateState:
        return _relaxed_step(1.0, fn, state, args)

    def current(self, state: IterateState) -> tuple[Z, Z]:
        return state.z, state.fz
