"""The algebraically reversible fixed-point solver of RevDEQ."""

import contextlib
import dataclasses
import functools as ft
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._custom_types import Args, Fn, Z
from .._misc import tree_add, tree_add_ct, tree_cast_like, tree_scale
from .._state import AbstractState, as_state
from .._state.base import deviation_size
from .base import AbstractReversibleSolver, BackwardBatch, ReverseCarry


class ReversibleState(eqx.Module):
    y: PyTree
    z: PyTree
    fz: PyTree  # f(z), in the dtype of z0: consumed by the next step and the residual.


class Reversible(AbstractReversibleSolver[ReversibleState]):
    r"""The coupled, algebraically reversible iteration of RevDEQ (eq. 5).

    Starting from $y_0 = z_0$, each step computes

    $y_{n+1} = (1 - \beta) y_n + \beta f(z_n)$,
    $z_{n+1} = (1 - \beta) z_n + \beta f(y_{n+1})$,

    two evaluations of $f$ per step, and returns $z_N$. Each step inverts in closed form:

    $z_n = (z_{n+1} - \beta f(y_{n+1})) / (1 - \beta)$,
    $y_n = (y_{n+1} - \beta f(z_n)) / (1 - \beta)$.

    For a contraction with constant $k$ both $y_n$ and $z_n$ converge to the fixed point
    whenever $0 < \beta < 2/(k+1)$, linearly at the speed of relaxed iteration
    (Theorem 3.1 of the paper).

    !!! info

        Reversal multiplies rounding errors by about $1/|1 - \beta|$ times the growth of
        the Jacobian of $f$ at every step, and the backward pass evaluates `fn` again in
        another compiled program, which may round differently. How the state is held
        decides what survives that (see [`revdeq_jax.AbstractState`][]):

        - `state_dtype="exact"` ([`revdeq_jax.ExactState`][]): fixed-point integers, an
          information buffer and a lattice that snaps re-evaluations back onto the
          forward's values. Reversal is exact to the bit at any depth whenever the
          re-evaluation lies within a stated number of ulps of the forward's value, so
          the gradient *equals* the unrolled gradient of the forward pass. Needs `beta`
          a ratio of small integers and `z0` of at most 32 bits; its buffer grows with
          `max_steps` (a few bits per element per step).
        - `state_dtype="auto"` ([`revdeq_jax.AutoState`][], the default): the exact
          state where it applies and the adjoint is reversible, else the dtype of `z0`.
        - `state_dtype=jnp.float64` ([`revdeq_jax.FloatState`][]): the paper's recipe,
          the state in float64 while `fn` runs in float32; exact for a few steps (many
          at `beta = 0.5`), then drifting.
        - `state_dtype="float32x2"` ([`revdeq_jax.TwoFloatState`][]): float32 pairs,
          about 48 bits, no 64-bit types; about as good as float64.
        - `state_dtype=None`: the dtype of `z0`; loses bits from the first step.

        [`revdeq_jax.ReversibleAdjoint`][] checks every reconstruction against the known
        `z0` on the backward pass.

    **Arguments:**

    - `beta`: relaxation in $(0, 2)$, not 1.
    - `state_dtype`: how the coupled state is held: a state object
      ([`revdeq_jax.ExactState`][], ...), or `"auto"` (the default), `"exact"`,
      `"float32x2"`, a floating dtype, or `None` (the dtype of `z0`).

    ??? cite "References"

        ```bibtex
        @article{mccallum2025reversible,
            title={Reversible Deep Equilibrium Models},
            author={McCallum, Sam and Arora, Kamran and Foster, James},
            journal={arXiv:2509.12917},
            year={2025}
        }
        ```
    """

    beta: float = 0.5
    state_dtype: AbstractState = eqx.field(default="auto", converter=as_state)

    nfe_per_step: ClassVar[int] = 2

    def __check_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise ValueError(
                f"`Reversible(beta=...)` must be a Python float, got {type(self.beta)}."
            )
        if not 0 < self.beta < 2 or self.beta == 1:
            raise ValueError(
                f"`Reversible(beta={self.beta})`: `beta` must lie in (0, 2) and not be 1. "
                "The inverse step divides by `1 - beta`; the iteration converges for "
                "contractions with constant k when beta < 2 / (k + 1). The paper uses 0.5 "
                "to 0.8."
            )
        self.state_dtype.check_beta(self.beta)

    def prepare(self, z0: Z, max_steps: int, *, differentiable: bool = False) -> "Reversible":
        state = self.state_dtype.resolve(z0, self.beta, max_steps, differentiable)
        return dataclasses.replace(self, state_dtype=state)

    def scope(self) -> contextlib.AbstractContextManager:
        return self.state_dtype.scope()

    @property
    def differentiable(self) -> bool:
        return self.state_dtype.differentiable

    # The solver's own arithmetic, leaf by leaf, in the state's precision. `x`: state
    # trees (whose leaves may be structured, hence `is_leaf`); `f`: values of `fn`, in
    # the dtype of `z0`.

    def _map(self, f, *trees):
        return jtu.tree_map(f, *trees, is_leaf=self.state_dtype.is_leaf)

    def _down(self, x: PyTree, like: PyTree) -> PyTree:
        return self._map(lambda x, l: self.state_dtype.decode(x, l.dtype), x, like)

    def _update(self, x: PyTree, f: PyTree) -> PyTree:
        return self._map(lambda x, f: self.state_dtype.update(x, f, self.beta), x, f)

    def _invert(self, x: PyTree, f: PyTree) -> PyTree:
        return self._map(lambda x, f: self.state_dtype.invert(x, f, self.beta), x, f)

    def init(self, fn: Fn, z0: Z, args: Args) -> ReversibleState:
        z = jtu.tree_map(self.state_dtype.encode, z0)
        # f at the state as held (for an exact state, z0 rounded to its grid), so that
        # the last reverse step undoes the first forward step with the same value.
        fz = fn(self._down(z, z0), args)
        return ReversibleState(y=z, z=z, fz=fz)

    def step(self, fn: Fn, state: ReversibleState, args: Args) -> ReversibleState:
        y = self._update(state.y, state.fz)
        fy = fn(self._down(y, state.fz), args)
        z = self._update(state.z, fy)
        fz = fn(self._down(z, state.fz), args)
        return ReversibleState(y=y, z=z, fz=fz)

    def append_only(self, state: ReversibleState) -> PyTree[bool]:
        flags = jtu.tree_map(lambda _: False, state)
        coupled = tuple(self._map(self.state_dtype.append_only, x) for x in (state.y, state.z))
        return eqx.tree_at(lambda s: (s.y, s.z), flags, coupled)

    def current(self, state: ReversibleState) -> tuple[Z, Z]:
        return self._down(state.z, state.fz), state.fz

    def coupled(self, state: ReversibleState) -> tuple[PyTree, PyTree]:
        return state.y, state.z

    def init_cotangents(self, value_bar: PyTree, y: PyTree) -> tuple[PyTree, PyTree]:
        del y
        z_bar = jtu.tree_map(
            lambda v: v.astype(self.state_dtype.cotangent_dtype(v.dtype)), value_bar
        )
        return jtu.tree_map(jnp.zeros_like, z_bar), z_bar

    def reconstruction(
        self, y: PyTree, z: PyTree, z0: PyTree, rtol: float | None
    ) -> dict[str, Array]:
        state = self.state_dtype
        abs_err = jnp.zeros((), jnp.float32)
        rel_err = jnp.zeros((), jnp.float32)
        drift = jnp.zeros((), jnp.float32)
        mismatch = jnp.zeros((), bool)
        for part in (y, z):
            leaves = jtu.tree_leaves(part, is_leaf=state.is_leaf)
            for x, c in zip(leaves, jtu.tree_leaves(z0), strict=True):
                err, rel = deviation_size(state.deviation(x, c), c)
                abs_err = jnp.maximum(abs_err, err)
                rel_err = jnp.maximum(rel_err, rel)
                drift = jnp.maximum(drift, getattr(x, "drift", drift))
                mismatch = mismatch | state.mismatch(x, c, rtol)
        return {"abs": abs_err, "rel": rel_err, "drift": drift, "mismatch": mismatch}

    def backward_step(
        self,
        fn: Fn,
        args: Args,
        carry: ReverseCarry,
        z_like: PyTree,
        *,
        batch: BackwardBatch | None = None,
    ) -> ReverseCarry:
        b = self.beta
        if batch is None:
            state_map = lambda f, *xs: f(*xs)
            call = _call
            only_active = lambda ct: ct
            accumulate = tree_add_ct
        else:
            # The state arithmetic is per example (an exact state's lattice exponent,
            # count and buffer are): mapped over the batch. `fn` runs once on the batch.
            state_map = lambda f, *xs: jax.vmap(f)(*xs)
            call = ft.partial(batch.call, _call)
            only_active = batch.only_active
            accumulate = batch.accumulate

        def undo(at, x, x_bar, params_bar):
            """Undoes `x_next = (1-b) x + b f(at)`: one VJP at `at` gives `f(at)` for the
            reconstruction of `x` and the pullback of `x_bar` (the cotangent of `x_next`)
            through `b f(at)`. Each evaluation's parameter cotangent is accumulated as it
            arrives, in the order reverse-mode autodiff would: this matters for
            low-precision (bfloat16) parameters.

            **Returns:** `(x, the cotangent reaching at, params_bar)`.
            """
            f, pull = eqx.filter_vjp(call, state_map(self._down, at, z_like), fn, args)
            x_prev = state_map(self._invert, x, f)
            at_bar, *step_bar = pull(only_active(tree_cast_like(tree_scale(b, x_bar), z_like)))
            return x_prev, at_bar, accumulate(params_bar, tuple(step_bar))

        y, z, y_bar, z_bar = carry.y, carry.z, carry.y_bar, carry.z_bar
        # z_{n+1} = (1-b) z_n + b f(y_{n+1}), then y_{n+1} = (1-b) y_n + b f(z_n).
        z_prev, y_in_bar, params_bar = undo(y, z, z_bar, carry.params_bar)
        y_bar = tree_add(y_bar, y_in_bar)
        y_prev, z_in_bar, params_bar = undo(z_prev, y, y_bar, params_bar)
        z_bar_prev = tree_add(tree_scale(1 - b, z_bar), z_in_bar)
        new = (y_prev, z_prev, tree_scale(1 - b, y_bar), z_bar_prev)
        if batch is not None:  # finished examples stay where they are
            new = batch.select(new, (carry.y, carry.z, carry.y_bar, carry.z_bar))
        return ReverseCarry(*new, params_bar)


def _call(z, fn, args):
    return fn(z, args)
