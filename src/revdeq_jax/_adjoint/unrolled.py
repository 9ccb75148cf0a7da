"""Plain autodiff through every stored iteration, and its checkpointed variant."""

from collections.abc import Callable

from .._custom_types import Args, Fn, Z
from .._iterate import LoopResult
from .._precision import is_exact
from .._solver.base import AbstractSolver
from .base import AbstractAdjoint


def _check_differentiable_state(adjoint: AbstractAdjoint, solver: AbstractSolver) -> None:
    if is_exact(solver.state_dtype):
        raise ValueError(
            f"`{type(adjoint).__name__}` differentiates through the solver's own "
            "arithmetic, which for `state_dtype='exact'` is integer arithmetic with zero "
            "derivative. Use `ReversibleAdjoint()` (which gives exactly the gradient of "
            "this forward pass), or a floating `state_dtype` for the unrolled reference."
        )


class UnrolledAdjoint(AbstractAdjoint):
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

    def check(self, solver: AbstractSolver) -> None:
        _check_differentiable_state(self, solver)

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
        return primal(fn, solver, z0, args, max_steps=max_steps, tol=tol, kind="unrolled")


class CheckpointAdjoint(AbstractAdjoint):
    """Exact autodiff through the loop with online recursive checkpointing.

    Uses `equinox.internal.while_loop(kind="checkpointed")`: the loop stops early on
    `tol` and only O(log max_steps) states are stored, at the price of recomputing
    iterations on the backward pass (about $O(N \\log N)$ evaluations). Works with any
    solver; the gradient is exact, like [`revdeq_jax.UnrolledAdjoint`][].
    """

    def check(self, solver: AbstractSolver) -> None:
        _check_differentiable_state(self, solver)

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
        return primal(fn, solver, z0, args, max_steps=max_steps, tol=tol, kind="checkpointed")
