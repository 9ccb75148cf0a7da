"""Broyden's (good) quasi-Newton method on the root problem f(z) - z = 0."""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree

from .._custom_types import Args, Fn, Z
from .._misc import residual_norm, tree_where
from .base import AbstractSolver


class BroydenState(eqx.Module):
    z: PyTree  # the best iterate so far (lowest ||f(z) - z||): what the solver returns
    fz: PyTree
    best_res: Float[Array, ""]
    x: Float[Array, " n"]  # the current iterate, flattened, and f - x there
    g: Float[Array, " n"]
    us: Float[Array, "m n"]
    vs: Float[Array, "m n"]
    k: Int[Array, ""]
    unravel: Callable = eqx.field(static=True)


class Broyden(AbstractSolver[BroydenState]):
    r"""Broyden's method, the original DEQ solver, with a low-rank inverse Jacobian.

    Solves $g(z) = f(z) - z = 0$ with an approximate inverse Jacobian
    $B = -I + \sum_i u_i v_i^\top$ (starting from $-I$, so the first step is a Picard
    step), updated by the Sherman-Morrison form of Broyden's "good" update after each
    step $z \leftarrow z - B g(z)$. Keeps the last `m` rank-one terms (a circular buffer).
    One evaluation of $f$ per step; no line search. Not reversible.

    Like the DEQ reference implementation it returns the best iterate seen so far, the
    one with the lowest residual $\|f(z) - z\|$: near the precision floor Broyden
    updates are made of noise and the iteration can wander off. (The absolute residual,
    not the relative one: it bounds the distance to the fixed point of a contraction,
    $\|z - z^*\| \le \|f(z) - z\| / (1 - k)$, also where that fixed point is 0.)

    The state is flattened into one vector per example, so all leaves of `z0` should
    share a dtype.

    !!! warning

        Differentiate it with [`revdeq_jax.ImplicitAdjoint`][]. Unrolling it
        ([`revdeq_jax.UnrolledAdjoint`][]) far past convergence differentiates rank-one
        updates divided by products of rounding-level differences, which overflows to
        NaN.
    """

    m: int = eqx.field(default=8, static=True)

    nfe_per_step: ClassVar[int] = 1

    def __check_init__(self):
        if self.m < 1:
            raise ValueError(f"`Broyden(m={self.m})`: the memory `m` must be >= 1.")

    def init(self, fn: Fn, z0: Z, args: Args) -> BroydenState:
        fz = fn(z0, args)
        x, unravel = ravel_pytree(z0)
        g = ravel_pytree(fz)[0] - x
        us = jnp.zeros((self.m, x.size), x.dtype)
        res = jax.lax.stop_gradient(residual_norm(z0, fz))
        return BroydenState(z0, fz, res, x, g, us, us, jnp.zeros((), jnp.int32), unravel)

    def step(self, fn: Fn, state: BroydenState, args: Args) -> BroydenState:
        x, g = state.x, state.g
        us, vs = state.us, state.vs

        def inv_jac(v):  # B v
            return -v + us.T @ (vs @ v)

        dx = -inv_jac(g)
        x_new = x + dx
        z = state.unravel(x_new)
        fz = fn(z, args)
        g_new = ravel_pytree(fz)[0] - x_new
        dg = g_new - g
        b_dg = inv_jac(dg)
        vt = -dx + vs.T @ (us @ dx)  # dx^T B
        denom = vt @ dg
        ok = jnp.abs(denom) > jnp.sqrt(jnp.finfo(x.dtype).eps) * jnp.maximum(
            jnp.linalg.norm(vt) * jnp.linalg.norm(dg), jnp.finfo(x.dtype).tiny
        )
        safe = jnp.where(ok, denom, 1)
        u = jnp.where(ok, (dx - b_dg) / safe, 0)
        v = jnp.where(ok, vt, 0)
        slot = state.k % self.m
        res = jax.lax.stop_gradient(residual_norm(z, fz))  # steers only
        better = res < state.best_res
        return BroydenState(
            tree_where(better, z, state.z),
            tree_where(better, fz, state.fz),
            jnp.where(better, res, state.best_res),
            x_new,
            g_new,
            us.at[slot].set(u),
            vs.at[slot].set(v),
            state.k + 1,
            state.unravel,
        )

    def current(self, state: BroydenState) -> tuple[Z, Z]:
        return state.z, state.fz
