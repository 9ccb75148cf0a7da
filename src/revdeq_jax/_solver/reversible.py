"""The algebraically reversible fixed-point solver of RevDEQ."""

import dataclasses
from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .. import _twofloat as tf
from .._custom_types import Args, Fn, Z
from .._exact import Exact, ExactArithmetic, rational_beta
from .._misc import (
    tree_add,
    tree_add_ct,
    tree_cast,
    tree_cast_like,
    tree_combine_lin,
    tree_div,
    tree_scale,
    tree_sub,
)
from .._precision import check_state_dtype, is_auto, is_exact, is_two_float
from .base import AbstractReversibleSolver


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
        the Jacobian of $f$ at every step, so the reconstruction error is geometric in the
        number of steps. Keep the state wider than `fn`:

        - `state_dtype=jnp.float64`: the state and the solver's add/sub/scale arithmetic
          in float64 (64-bit types are switched on only for that arithmetic; `fn` still
          sees the dtype of `z0`). Needs a backend with float64.
        - `state_dtype="float32x2"`: a two-float state, each value an unevaluated float32
          pair with about 48 significant bits, updated with error-free transformations.
          Needs no 64-bit types at all (TPUs, consumer GPUs); about as exact as float64
          for a few steps, a little less at depth.

        With `beta = 0.5` the scalings are exact in binary, which keeps reconstructions
        bit-exact for longest. Use [`revdeq_jax.reconstruction_error`][] to check.

        All of these still lose the gradient at depth: with `beta = 0.9` a float64 state
        is off by 1e-2 to nan after 16 steps of an attention block. For exact gradients
        at any depth use

        - `state_dtype="exact"` (or [`revdeq_jax.ExactState`][]): a fixed-point int64
          state whose update is integer arithmetic with `beta` held as a ratio `a / b`,
          and an information buffer that keeps the remainder each step divides away
          (2, 4.9 and 7.1 bits per element per step for `beta` = 0.5, 0.8, 0.9). Reversal
          is then exact to the bit and the gradient *equals* the unrolled gradient of
          the forward pass; measured within 4e-6 of the float64 unrolled gradient at 64
          steps with a float32 `fn`. Needs no 64-bit floats. Requires `fn` to give the
          same bits when it is evaluated again on the backward pass, which is a
          separately compiled program: true of every block tested on CPU. Should a
          compiler round `fn` differently there, the reconstruction error reported by
          `ReversibleAdjoint(report=...)` (exactly zero otherwise) shows it.

    **Arguments:**

    - `beta`: relaxation in $(0, 2)$, not 1.
    - `state_dtype`: `None` (the dtype of `z0`), a floating dtype, `"float32x2"`,
      `"exact"` / [`revdeq_jax.ExactState`][], or `"auto"`: the exact state when `z0` is
      at most 32-bit and `beta` a ratio of small integers, else the dtype of `z0` (the
      exact state's fixed-point grid, 2**-32, would be coarser than a float64 `z0`).
    - `buffer_steps`: set by [`revdeq_jax.fixed_point`][] from `max_steps` (it sizes the
      information buffer of an exact state); leave it unset.

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
    state_dtype: Any = eqx.field(default=None, converter=check_state_dtype)
    buffer_steps: int | None = eqx.field(default=None, static=True, repr=False)

    nfe_per_step: ClassVar[int] = 2

    def __check_init__(self):
        if not isinstance(self.beta, (int, float)):
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
        if self._exact:
            rational_beta(self.beta)  # raises if beta is not a ratio of small integers

    def specialise(self, z0: Z) -> "Reversible":
        if not is_auto(self.state_dtype):
            return self
        narrow = all(
            jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.dtype(leaf.dtype).itemsize <= 4
            for leaf in jtu.tree_leaves(z0)
        )
        try:
            rational_beta(self.beta)
            rational = True
        except ValueError:
            rational = False
        return dataclasses.replace(self, state_dtype="exact" if narrow and rational else None)

    def with_max_steps(self, max_steps: int) -> "Reversible":
        if self._exact:
            return dataclasses.replace(self, buffer_steps=max_steps)
        return self

    # The solver's own arithmetic, in the state's precision. `x`, `out`: state trees;
    # `f`: values of `fn`, in the dtype of `z0`.

    @property
    def _two_float(self) -> bool:
        return is_two_float(self.state_dtype)

    @property
    def _exact(self) -> bool:
        return is_exact(self.state_dtype)

    @property
    def _arith(self) -> ExactArithmetic:
        a, b = rational_beta(self.beta)
        return ExactArithmetic(a, b, self.state_dtype.fraction_bits)

    def _up(self, tree: PyTree) -> PyTree:
        if is_auto(self.state_dtype):
            raise ValueError(
                '`state_dtype="auto"` is resolved by `fixed_point` from `z0`; call '
                "`solver.specialise(z0)` first when driving the solver by hand."
            )
        if self._exact:
            if self.buffer_steps is None:
                raise ValueError(
                    "An exact reversible state needs the number of steps to size its "
                    "buffer; run the solver through `fixed_point` or `DEQ`."
                )
            arith = self._arith
            return jtu.tree_map(lambda x: arith.encode(x, self.buffer_steps), tree)
        if self._two_float:
            return jtu.tree_map(tf.from_float, tree)
        return tree_cast(tree, self.state_dtype)

    def _down(self, state: PyTree, like: PyTree) -> PyTree:
        if self._exact:
            arith = self._arith
            return jtu.tree_map(
                lambda x, l: arith.decode(x, l.dtype), state, like, is_leaf=_is_exact
            )
        if self._two_float:
            return jtu.tree_map(lambda x, l: tf.to_float(x, l.dtype), state, like, is_leaf=_is_tf)
        return tree_cast_like(state, like)

    def _lin(self, a: float, x: PyTree, b: float, f: PyTree) -> PyTree:
        """`a * x + b * f`."""
        if self._exact:  # a, b are 1 - beta, beta: held exactly as a ratio instead
            return jtu.tree_map(self._arith.push, x, f, is_leaf=_is_exact)
        if self._two_float:
            return jtu.tree_map(
                lambda x, f: tf.add(tf.scale(a, x), tf.scale_float(b, f)),
                x,
                f,
                is_leaf=_is_tf,
            )
        return tree_combine_lin(a, x, b, f)

    def _invert(self, out: PyTree, f: PyTree) -> PyTree:
        """`(out - beta * f) / (1 - beta)`: undoes `_lin(1 - beta, x, beta, f)`."""
        b = self.beta
        if self._exact:
            return jtu.tree_map(self._arith.pop, out, f, is_leaf=_is_exact)
        if self._two_float:
            return jtu.tree_map(
                lambda o, f: tf.divide(tf.add(o, tf.neg(tf.scale_float(b, f))), 1 - b),
                out,
                f,
                is_leaf=_is_tf,
            )
        # Upcast f before scaling, exactly as the forward step does.
        return tree_div(tree_sub(out, tree_scale(b, tree_cast_like(f, out))), 1 - b)

    def init_cotangents(self, value_bar: PyTree, y: PyTree) -> tuple[PyTree, PyTree]:
        if self._two_float or self._exact:  # cotangents need no extra precision
            z_bar = jtu.tree_map(
                lambda v: v.astype(jnp.promote_types(v.dtype, jnp.float32)), value_bar
            )
        else:
            z_bar = tree_cast_like(value_bar, y)
        return jtu.tree_map(jnp.zeros_like, z_bar), z_bar

    def deviation(self, state_part: PyTree, z0: PyTree) -> PyTree:
        if self._exact:
            return jtu.tree_map(self._arith.difference, state_part, z0, is_leaf=_is_exact)
        if self._two_float:
            return jtu.tree_map(tf.sub_float, state_part, z0, is_leaf=_is_tf)
        return jtu.tree_map(lambda a, c: a - c.astype(a.dtype), state_part, z0)

    def init(self, fn: Fn, z0: Z, args: Args) -> ReversibleState:
        z = self._up(z0)
        # f at the state as held (for an exact state, z0 rounded to its grid), so that
        # the last reverse step undoes the first forward step with the same value.
        fz = fn(self._down(z, z0), args)
        return ReversibleState(y=z, z=z, fz=fz)

    def step(self, fn: Fn, state: ReversibleState, args: Args) -> ReversibleState:
        b = self.beta
        y = self._lin(1 - b, state.y, b, state.fz)
        fy = fn(self._down(y, state.fz), args)
        z = self._lin(1 - b, state.z, b, fy)
        fz = fn(self._down(z, state.fz), args)
        return ReversibleState(y=y, z=z, fz=fz)

    def current(self, state: ReversibleState) -> tuple[Z, Z]:
        return self._down(state.z, state.fz), state.fz

    def coupled(self, state: ReversibleState) -> tuple[PyTree, PyTree]:
        return state.y, state.z

    def reverse_step(
        self, fn: Fn, args: Args, y: PyTree, z: PyTree, z_like: PyTree
    ) -> tuple[PyTree, PyTree]:
        fy = fn(self._down(y, z_like), args)
        z_prev = self._invert(z, fy)
        fz = fn(self._down(z_prev, z_like), args)
        y_prev = self._invert(y, fz)
        return y_prev, z_prev

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
        b = self.beta
        # z_{n+1} = (1-b) z_n + b f(y_{n+1}): one VJP gives f(y_{n+1}) for the
        # reconstruction of z_n and the pullback for the cotangents.
        fy, pull_y = eqx.filter_vjp(_call, self._down(y, z_like), fn, args)
        z_prev = self._invert(z, fy)
        y_in_bar, *step_bar = pull_y(tree_cast_like(tree_scale(b, z_bar), z_like))
        # Accumulate each evaluation's cotangent as it arrives, in the order reverse-mode
        # autodiff would: this matters for low-precision (bfloat16) parameters.
        params_bar = tree_add_ct(params_bar, tuple(step_bar))
        y_bar = tree_add(y_bar, y_in_bar)
        z_bar_prev = tree_scale(1 - b, z_bar)
        # y_{n+1} = (1-b) y_n + b f(z_n).
        fz, pull_z = eqx.filter_vjp(_call, self._down(z_prev, z_like), fn, args)
        y_prev = self._invert(y, fz)
        z_in_bar, *step_bar = pull_z(tree_cast_like(tree_scale(b, y_bar), z_like))
        params_bar = tree_add_ct(params_bar, tuple(step_bar))
        z_bar_prev = tree_add(z_bar_prev, z_in_bar)
        y_bar_prev = tree_scale(1 - b, y_bar)
        return y_prev, z_prev, y_bar_prev, z_bar_prev, params_bar


def _is_tf(x) -> bool:
    return isinstance(x, tf.TwoFloat)


def _is_exact(x) -> bool:
    return isinstance(x, Exact)


def _call(z, fn, args):
    return fn(z, args)
