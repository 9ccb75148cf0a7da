"""Plain autodiff through every stored iteration, and its checkpointed variant."""

import abc
from typing import ClassVar

from .._iterate import (
    checkpointed_while_loop,
    Inputs,
    LoopResult,
    Primal,
    unrolled_while_loop,
    WhileLoop,
)
from .._solver.base import AbstractSolver
from .base import AbstractAdjoint


class _AutodiffAdjoint(AbstractAdjoint):
    """Reverse-mode autodiff through the solver's own steps, run with the loop
    `while_loop()` gives."""

    differentiates_solver: ClassVar[bool] = True

    @abc.abstractmethod
    def while_loop(self) -> WhileLoop:
        """The reverse-differentiable loop the primal runs with."""

    def check(self, solver: AbstractSolver) -> None:
        if not solver.differentiable:
            raise ValueError(
                f"`{type(self).__name__}` differentiates through the solver's own "
                "arithmetic, which for this solver's state (e.g. `state_dtype='exact'` or "
                "`'auto'`) is integer arithmetic with zero derivative. Use "
                "`ReversibleAdjoint()` (which gives exactly the gradient of this forward "
                "pass), or a floating `state_dtype` for the unrolled reference."
            )

    def apply(self, primal: Primal, inputs: Inputs, solver: AbstractSolver) -> LoopResult:
        self.check(solver)
        return primal(inputs, self.while_loop())


class UnrolledAdjoint(_AutodiffAdjoint):
    """Backpropagates through the stored iterations with ordinary reverse-mode autodiff.

    The loop is a `lax.scan` over all `max_steps` steps; once the residual drops below
    `tol` the remaining steps are masked out (they still cost time), so the value and the
    gradient are those of the loop that stopped early. Memory grows linearly with
    `max_steps`.

    This is the *exact* gradient of the finite-precision computation, computed
    independently of any reversal: the reference that
    [`revdeq_jax.ReversibleAdjoint`][] is tested against, and the "explicit weight-tied
    network" baseline.
    """

    def while_loop(self) -> WhileLoop:
        return unrolled_while_loop


class CheckpointAdjoint(_AutodiffAdjoint):
    """Exact autodiff through the loop with online recursive checkpointing.

    Uses `equinox.internal.while_loop(kind="checkpointed")`: the loop stops early on
    `tol` and only O(log max_steps) states are stored, at the price of recomputing
    iterations on the backward pass (about $O(N \\log N)$ evaluations). Works with any
    solver whose arithmetic is differentiable; the gradient is exact, like
    [`revdeq_jax.UnrolledAdjoint`][].
    """

    def while_loop(self) -> WhileLoop:
        return checkpointed_while_loop
