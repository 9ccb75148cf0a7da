"""Abstract solver interfaces: every fixed-point solver is a strategy object."""

import abc
import contextlib
from typing import ClassVar, Generic

import equinox as eqx
from jaxtyping import Array, PyTree

from .._custom_types import Args, Fn, SolverState, Z


class AbstractSolver(eqx.Module, Generic[SolverState]):
    """Abstract base class for fixed-point solvers of $z = f(z, x)$.

    A solver is an immutable strategy object. The loop that drives it (and the adjoint
    that decides how that loop is differentiated) lives elsewhere; a solver only knows
    how to start, how to take one step, and where its current iterate is.

    Concrete solvers set the class variable `nfe_per_step` (evaluations of `fn` per
    `step`); `init` evaluates `fn` once, at `z0`.
    """

    nfe_per_step: ClassVar[int]

    @abc.abstractmethod
    def init(self, fn: Fn, z0: Z, args: Args) -> SolverState:
        """Builds the initial state from `z0`, evaluating `fn(z0, args)` once.

        **Arguments:**

        - `fn`: the function whose fixed point is sought.
        - `z0`: the initial guess, a PyTree of floating arrays.
        - `args`: extra (input-injection) arguments passed to `fn`.

        **Returns:** the solver state.
        """

    @abc.abstractmethod
    def step(self, fn: Fn, state: SolverState, args: Args) -> SolverState:
        """One solver iteration. Pure: returns the new state and nothing else."""

    @abc.abstractmethod
    def current(self, state: SolverState) -> tuple[Z, Z]:
        """The current iterate $z$ and $f(z)$, both in the dtype of `z0`.

        Used for the stopping test (the relative residual) and for the output.
        """

    def prepare(self, z0: Z, max_steps: int, *, differentiable: bool = False) -> "AbstractSolver":
        """This solver, with every choice that depends on `z0`, on `max_steps` or on the
        adjoint made.

        Called once by [`revdeq_jax.fixed_point`][], before anything else sees the
        solver; the forward and the backward pass then both use the object it returns
        (e.g. `Reversible(state_dtype="auto")` picks its state from the dtype of `z0`,
        and an exact state sizes its buffer by `max_steps`). `differentiable` says that
        the adjoint differentiates through `step` with autodiff, so the solver's
        arithmetic must have a derivative. The default returns `self`.
        """
        del z0, max_steps, differentiable
        return self

    def scope(self) -> contextlib.AbstractContextManager:
        """A context for the solver's own arithmetic (e.g. 64-bit types for a wide state).

        The loop and the backward pass run inside it; `fn` is always called with the
        caller's own setting. The default does nothing.
        """
        return contextlib.nullcontext()

    @property
    def differentiable(self) -> bool:
        """Whether ordinary autodiff through `step` gives the derivative of the iteration
        (false for integer state arithmetic)."""
        return True


class AbstractReversibleSolver(AbstractSolver[SolverState]):
    """A solver whose every step can be inverted in closed form.

    Its coupled state `(y, z)` after `N` steps determines the whole trajectory, which is
    what [`revdeq_jax.ReversibleAdjoint`][] uses to backpropagate exactly in memory that
    does not grow with `N`.
    """

    @abc.abstractmethod
    def coupled(self, state: SolverState) -> tuple[PyTree, PyTree]:
        """The coupled state `(y, z)`, in the solver's state dtype."""

    @abc.abstractmethod
    def init_cotangents(self, value_bar: PyTree, y: PyTree) -> tuple[PyTree, PyTree]:
        """Cotangent accumulators `(y_bar, z_bar)` at the end of the loop, from the
        cotangent `value_bar` of the output."""

    @abc.abstractmethod
    def reconstruction(
        self, y: PyTree, z: PyTree, z0: PyTree, rtol: float | None
    ) -> dict[str, Array]:
        """How far a reconstructed coupled state `(y, z)` lies from the initial state `z0`
        it should equal: a dict of scalars `"abs"` (largest deviation), `"rel"` (that over
        `max(max|z0|, 1)`), `"drift"` (how far re-evaluations of `fn` fell from the values
        they were snapped to, where the state snaps; else 0) and `"mismatch"` (whether
        the reversible gradient is not to be trusted; `rtol=None`: the state's own
        threshold)."""

    @abc.abstractmethod
    def backward_step(
        self,
        fn: Fn,
        args: Args,
        y: PyTree,
        z: PyTree,
        y_bar: PyTree,
        z_bar: PyTree,
        params_bar: tuple[PyTree, PyTree],
        z_like: PyTree,
    ) -> tuple[PyTree, PyTree, PyTree, PyTree, tuple[PyTree, PyTree]]:
        """Inverts one step and pulls the cotangents back through it.

        `params_bar = (fn_bar, args_bar)` accumulates the cotangents of `fn` (its
        closed-over arrays) and of `args`; `z_like` gives the dtypes `fn` works in.

        **Returns:** `(y_prev, z_prev, y_bar_prev, z_bar_prev, params_bar)`.
        """
