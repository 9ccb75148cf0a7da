"""Abstract gradient strategy: how the fixed-point loop is run and differentiated."""

import abc
from collections.abc import Callable

import equinox as eqx

from .._custom_types import Args, Fn, Z
from .._iterate import LoopResult
from .._solver.base import AbstractSolver


class AbstractAdjoint(eqx.Module):
    """Abstract base class for the ways of differentiating a fixed-point solve.

    The loop itself is written once (`iterate`); an adjoint is handed that primal
    function and decides how it is run and how gradients flow through it.
    """

    def check(self, solver: AbstractSolver) -> None:
        """Raises at trace time if this adjoint cannot differentiate `solver`."""
        del solver

    @abc.abstractmethod
    def apply(
        self,
        primal: Callable[..., LoopResult],
        fn: Fn,
        solver: AbstractSolver,
        z0: Z,
        args: Args,
        *,
        max_steps: int,
        tol: float,
    ) -> LoopResult:
        """Solves for the fixed point, differentiably.

        **Arguments:**

        - `primal`: the loop, `primal(fn, solver, z0, args, *, max_steps, tol, kind)`.
        - `fn`: the function, a PyTree whose array leaves are its closed-over arrays
          (parameters); cotangents must flow to them.
        - `solver`, `z0`, `args`, `max_steps`, `tol`: as in
          [`revdeq_jax.fixed_point`][].

        **Returns:** a `LoopResult`, whose `value` carries the gradient.
        """
