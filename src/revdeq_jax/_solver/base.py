"""Abstract solver interfaces: every fixed-point solver is a strategy object."""

import abc
from typing import Any, ClassVar, Generic

import equinox as eqx
from jaxtyping import PyTree

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

    def specialise(self, z0: Z) -> "AbstractSolver":
        """This solver, with any choice that depends on the initial state made.

        Called by [`revdeq_jax.fixed_point`][] before anything else sees the solver (e.g.
        `Reversible(state_dtype="auto")` picks its state from the dtype of `z0`). The
        default returns `self`.
        """
        del z0
        return self

    def with_max_steps(self, max_steps: int) -> "AbstractSolver":
        """This solver, prepared for a loop of at most `max_steps` steps.

        Called by the loop before `init`; a solver that sizes buffers by the number of
        steps returns a copy that knows it. The default returns `self`.
        """
        del max_steps
        return self

    @property
    def state_dtype(self) -> Any:
        """Dtype of the solver's own arithmetic; `None` means the dtype of `z0`."""
        return None


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
    def deviation(self, state_part: PyTree, z0: PyTree) -> PyTree:
        """`state_part - z0`, leafwise, as plain arrays (for reconstruction errors)."""

    @abc.abstractmethod
    def reverse_step(
        self, fn: Fn, args: Args, y: PyTree, z: PyTree, z_like: PyTree
    ) -> tuple[PyTree, PyTree]:
        """Inverts one step: $(y_{n+1}, z_{n+1}) \\mapsto (y_n, z_n)$."""

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
