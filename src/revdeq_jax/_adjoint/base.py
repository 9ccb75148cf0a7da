"""Abstract gradient strategy: how the fixed-point loop is run and differentiated."""

import abc
from typing import ClassVar

import equinox as eqx

from .._iterate import Inputs, LoopResult, Primal
from .._solver.base import AbstractSolver


class AbstractAdjoint(eqx.Module):
    """Abstract base class for the ways of differentiating a fixed-point solve.

    The loop itself is written once (`iterate`); an adjoint is handed that primal
    function, runs it with a loop of its choice and decides how gradients flow through
    it.
    """

    differentiates_solver: ClassVar[bool] = False
    """Whether `apply` differentiates through the solver's steps with autodiff (then the
    solver's own arithmetic must have a derivative)."""

    def check(self, solver: AbstractSolver) -> None:
        """Raises at trace time if this adjoint cannot differentiate `solver`."""
        del solver

    @abc.abstractmethod
    def apply(self, primal: Primal, inputs: Inputs, solver: AbstractSolver) -> LoopResult:
        """Solves for the fixed point, differentiably.

        **Arguments:**

        - `primal`: the loop, `primal(inputs, while_loop)`, with the solver, `max_steps`
          and `tol` already bound; the adjoint runs it with a `while_loop` of its choice
          (`lax_while_loop`, `unrolled_while_loop`, `checkpointed_while_loop`) and decides
          how gradients flow through it.
        - `inputs`: `(fn, args, z0)`, everything cotangents flow to. `fn` is a PyTree
          whose array leaves are its closed-over arrays (parameters).
        - `solver`: the prepared solver `primal` runs (for backward passes that need it).

        **Returns:** a `LoopResult`, whose `value` carries the gradient.
        """
