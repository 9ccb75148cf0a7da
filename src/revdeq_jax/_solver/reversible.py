"""The algebraically reversible fixed-point solver of RevDEQ."""

from typing import Any, ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .. import _twofloat as tf
from .._custom_types import Args, Fn, Z
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
from .._precision import check_state_dtype, is_two_float
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

    **Arguments:**

    - `beta`: relaxation in $(0, 2)$, not 1.
    - `state_dtype`: `None` (the dtype of `z0`), a floating dtype, or `"float32x2"`.

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

    # The solver's own arithmetic, in the state's precision. `x`, `out`: state trees;
    # `f`: values of `fn`, in the dtype of `z0`.

    @property
    def _two_float(self) -> bool:
        return is_two_float(self.state_dtype)

    def _up(self, tree: PyTree) -> PyTree:
        if self._two_float:
            return jtu.tree_map(tf.from_float, tree)
        return tree_cast(tree, self.state_dtype)

    def _down(self, state: PyTree, like: PyTree) -> PyTree:
        if self._two_float:
            return jtu.tree_map(lambda x, l: tf.to_float(x, l.dtype), state, like, is_leaf=_is_tf)
        return tree_cast_like(state, like)

    def _lin(self, a: float, x: PyTree, b: float, f: PyTree) -> PyTree:
        """`a * x + b * f`."""
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
        if self._two_float:  # cotangents need no extra precision: float32
            z_bar = jtu.tree_map(
                lambda v: v.astype(jnp.promote_types(v.dtype, jnp.float32)), value_bar
            )
        else:
            z_bar = tree_cast_like(value_bar, y)
        return jtu.tree_map(jnp.zeros_like, z_bar), z_bar

    def deviation(self, state_part: PyTree, z0: PyTree) -> PyTree:
        if self._two_float:
            return jtu.tree_map(tf.sub_float, state_part, z0, is_leaf=_is_tf)
        return jtu.tree_map(lambda a, c: a - c.astype(a.dtype), state_part, z0)

    def init(self, fn: Fn, z0: Z, args: Args) -> ReversibleState:
        fz = fn(z0, args)
        z = self._up(z0)
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


def _call(z, fn, args):
    return fn(z, args)
