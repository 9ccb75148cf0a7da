"""Abstract solver interfaces: every fixed-point solver is a strategy object."""

import abc
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Generic

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree

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

    def append_only(self, state: SolverState) -> PyTree[bool]:
        """Which leaves of `state` (a tree of bools shaped like it) a step only writes at
        positions the solve has not used yet, such as an exact state's information
        buffer: a step past the end of a solve leaves everything that is read unchanged.
        Under per-example `vmap`, the loop of a reversible solve lets the examples that
        have stopped write these leaves rather than masking them, so XLA updates them in
        place instead of copying them every step. The default: none."""
        return jtu.tree_map(lambda _: False, state)

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
        they were snapped to, in ulps of `fn`'s dtype at the leaf's largest binade, where
        the state snaps; else 0) and `"mismatch"` (whether
        the reversible gradient is not to be trusted; `rtol=None`: the state's own
        threshold)."""

    @abc.abstractmethod
    def backward_step(
        self,
        fn: Fn,
        args: Args,
        carry: "ReverseCarry",
        z_like: PyTree,
        *,
        batch: "BackwardBatch | None" = None,
    ) -> "ReverseCarry":
        """Inverts one step and pulls the cotangents back through it: `carry` holds the
        coupled state after the step and its cotangents; returns them before it.

        `carry.params_bar = (fn_bar, args_bar)` accumulates the cotangents of `fn` (its
        closed-over arrays) and of `args`; `z_like` gives the dtypes `fn` works in.

        With `batch` (see `BackwardBatch`) the step acts on a whole batch of solves at
        once: the state, its cotangents and `z_like` carry a leading batch axis, `fn` is
        evaluated once on the batch, the state arithmetic is mapped over it, and only the
        examples `batch.active` marks move; the others come back unchanged.
        """


class ReverseCarry(eqx.Module):
    """What the reversed loop carries from step to step: the coupled state `(y, z)`, its
    cotangents, and the accumulated cotangents `params_bar = (fn_bar, args_bar)`."""

    y: PyTree
    z: PyTree
    y_bar: PyTree
    z_bar: PyTree
    params_bar: tuple[PyTree, PyTree]


@dataclasses.dataclass(frozen=True)
class BackwardBatch:
    """How a batch of reversible solves is walked back together (one loop for the batch,
    each example stopping on its own).

    `fn_axes` and `args_axes` are trees of `0` (the leaf has a leading batch axis) or
    `None` (shared by the batch, e.g. the parameters), shaped like the array part
    (`eqx.partition(_, eqx.is_array)`) of `fn` and `args`. `active` says which examples
    still have steps to undo.
    """

    fn_axes: PyTree[int | None]
    args_axes: PyTree[int | None]
    active: Bool[Array, " batch"]

    def call(self, fn_call: Callable[[Any, Any, Any], Any], x: PyTree, fn: Any, args: Any):
        """`fn_call(x, fn, args)` for every example of the batch `x`, as *one* function
        of the shared leaves: its VJP sums their cotangents over the batch, as the
        backward pass of a batched `fn` would, instead of keeping one per example."""
        fn_dyn, fn_static = eqx.partition(fn, eqx.is_array)
        args_dyn, args_static = eqx.partition(args, eqx.is_array)

        def _one(x, fn_dyn, args_dyn):
            return fn_call(x, eqx.combine(fn_dyn, fn_static), eqx.combine(args_dyn, args_static))

        return jax.vmap(_one, in_axes=(0, self.fn_axes, self.args_axes))(x, fn_dyn, args_dyn)

    def _mask(self, x: Array) -> Array:
        return self.active.reshape(self.active.shape + (1,) * (x.ndim - 1))

    def select(self, new: PyTree, old: PyTree) -> PyTree:
        """`new` for the active examples, `old` for the others (leaves batched on axis 0)."""
        return jtu.tree_map(lambda n, o: jnp.where(self._mask(n), n, o), new, old)

    def only_active(self, tree: PyTree) -> PyTree:
        """`tree` (batched on axis 0) with the inactive examples' entries zeroed."""
        return jtu.tree_map(lambda x: jnp.where(self._mask(x), x, jnp.zeros_like(x)), tree)

    def accumulate(
        self, acc: tuple[PyTree, PyTree], new: tuple[PyTree, PyTree]
    ) -> tuple[PyTree, PyTree]:
        """Adds the cotangents `new = (fn_bar, args_bar)` of one evaluation to `acc`:
        shared leaves as they come (the inactive examples contributed zero), per-example
        leaves only where active, so that a finished example's stay as they were."""

        def _add(axis, a, b):
            if a is None:
                return b
            if b is None:
                return a
            total = a + b.astype(a.dtype)
            return total if axis is None else jnp.where(self._mask(a), total, a)

        def _tree(axes, acc, new):
            # `axes` is shaped like the array part of the tree, `acc`/`new` like its
            # inexact part: both have `None` wherever there is nothing to add.
            return jtu.tree_map(_add, axes, acc, new, is_leaf=lambda x: x is None)

        return _tree(self.fn_axes, acc[0], new[0]), _tree(self.args_axes, acc[1], new[1])
