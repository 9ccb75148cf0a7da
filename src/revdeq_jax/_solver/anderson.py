"""Anderson acceleration (type-II Anderson mixing), safeguarded."""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._custom_types import Args, Fn, Z
from .._misc import tree_l2, tree_where
from .base import AbstractSolver


class AndersonState(eqx.Module):
    z: PyTree  # the latest iterate and f there: where the next step starts
    fz: PyTree
    res: Float[Array, ""]  # ||f(z) - z||_2 there
    best_z: PyTree  # the iterate with the lowest ||f(z) - z|| so far: what is returned
    best_fz: PyTree
    best_res: Float[Array, ""]
    xs: Float[Array, "m n"]  # past iterates, flattened (a circular buffer)
    fs: Float[Array, "m n"]  # f at past iterates
    k: Int[Array, ""]  # entries written since the last restart
    restarted: Bool[Array, ""]  # whether the last step restarted (a statistic)
    unravel: Callable = eqx.field(static=True)


class Anderson(AbstractSolver[AndersonState]):
    r"""Anderson acceleration with memory `m` and mixing `beta`, safeguarded.

    Keeps the last `m` iterates $x_i$ and values $f(x_i)$, with residuals
    $g_i = f(x_i) - x_i$, picks weights $\alpha$ with $\sum_i \alpha_i = 1$ that minimise

    $\|\sum_i \alpha_i g_i\|^2 + \lambda \|\alpha\|^2$,

    and steps to $\beta \sum_i \alpha_i f(x_i) + (1 - \beta) \sum_i \alpha_i x_i$. One
    evaluation of $f$ per step. The usual forward solver of classic DEQs; not reversible.

    Plain Anderson mixing breaks down on easy problems: the residuals of a converging
    iteration become collinear (an ill-conditioned least-squares system), and once they
    shrink towards a fixed point at 0 or the precision floor their squares underflow,
    giving NaN weights. So this one

    - solves the least-squares system on residuals divided by their largest entry, with
      the ridge $\lambda$ = `ridge` times the largest squared (scaled) residual: the
      regularisation is relative to the residual scale, never underflows, and bounds
      $|\alpha|$ by about $\sqrt{m}/$`ridge`;
    - falls back to the relaxed step $x \leftarrow (1 - \beta) x + \beta f(x)$ (from the
      latest iterate) when the weights come out non-finite, or all residuals in memory
      are exactly zero;
    - restarts (empties its memory and takes the relaxed step from the best iterate so
      far) when the latest residual exceeds `restart` times the lowest seen, or is not
      finite;
    - returns the best iterate seen, the one with the lowest $\|f(z) - z\|$, as
      [`revdeq_jax.Broyden`][] does.

    On a contraction the relaxed step from the best iterate reduces the residual (for
    $0 < \beta \le 1$), so the iteration cannot diverge or produce NaN. Every solver
    accepts `fixed_point(..., rtol, atol)`; a fixed point at 0 needs `atol`.

    The state is flattened into one vector per example, so all leaves of `z0` should
    share a dtype.

    !!! warning

        Differentiate it with [`revdeq_jax.ImplicitAdjoint`][]. Unrolling it
        ([`revdeq_jax.UnrolledAdjoint`][]) is exact for the steps taken, but the
        derivative of the weights of residuals that have reached the rounding floor
        is noise: run far past convergence, the unrolled gradient can be wrong by O(1)
        in float32.

    **Arguments:**

    - `m`: memory (number of past iterates), >= 1. `m=1` is relaxed iteration.
    - `beta`: mixing in $(0, 1]$.
    - `ridge`: relative Tikhonov regularisation of the least-squares system, >= 0.
    - `restart`: restart when the residual grows to this multiple of the lowest seen;
      > 1.
    """

    m: int = eqx.field(default=5, static=True)
    beta: float = 1.0
    ridge: float = 1e-4
    restart: float = 10.0

    nfe_per_step: ClassVar[int] = 1

    def __check_init__(self):
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"`Anderson(m={self.m!r})`: the memory `m` must be an int >= 1.")
        if not 0 < self.beta <= 1:
            raise ValueError(f"`Anderson(beta={self.beta})`: `beta` must lie in (0, 1].")
        if not 0 <= self.ridge < float("inf"):
            raise ValueError(f"`Anderson(ridge={self.ridge})` must be >= 0 and finite.")
        if not self.restart > 1:
            raise ValueError(
                f"`Anderson(restart={self.restart})` must be > 1: it is the growth of the "
                "residual over the lowest seen at which the memory is emptied."
            )

    def init(self, fn: Fn, z0: Z, args: Args) -> AndersonState:
        fz = fn(z0, args)
        x, unravel = ravel_pytree(z0)
        res = _residual(x, ravel_pytree(fz)[0])
        xs = jnp.zeros((self.m, x.size), x.dtype)
        zero = jnp.zeros((), jnp.int32)
        no = jnp.zeros((), bool)
        return AndersonState(z0, fz, res, z0, fz, res, xs, xs, zero, no, unravel)

    def step(self, fn: Fn, state: AndersonState, args: Args) -> AndersonState:
        # Restart from the best iterate if the residual grew too much (or is not finite).
        restart = ~(state.res <= self.restart * state.best_res)
        x = ravel_pytree(tree_where(restart, state.best_z, state.z))[0]
        f = ravel_pytree(tree_where(restart, state.best_fz, state.fz))[0]
        k = jnp.where(restart, 0, state.k)
        slot = k % self.m
        xs = state.xs.at[slot].set(x)
        fs = state.fs.at[slot].set(f)
        valid = (jnp.arange(self.m) < jnp.minimum(k + 1, self.m))[:, None]
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        g = jnp.where(valid, fs - xs, 0).astype(dtype)
        # Scale by the largest entry, so that squares neither underflow nor overflow.
        # The weights do not depend on the scale (they are homogeneous of degree 0 in
        # g), so it carries no gradient: the chain rule through g / scale would form
        # g / scale**2, which overflows near a fixed point at 0.
        scale = jax.lax.stop_gradient(jnp.max(jnp.abs(g)))
        nonzero = jnp.isfinite(scale) & (scale > 0)
        g = g / jnp.where(nonzero, scale, 1)
        gram = g @ g.T
        lam = self.ridge * jnp.max(jnp.diag(gram))
        eye = jnp.eye(self.m, dtype=dtype)
        # Unused slots get an identity row/column and a zero right-hand side, so their
        # weights solve to 0. Minimising ||G^T a||^2 + lam ||a||^2 subject to sum(a) = 1
        # gives a = y / sum(y) with (G G^T + lam I) y = 1.
        mask = valid & valid.T
        # (Every `where` guards its operands too, so that autodiff through a step, e.g.
        # under `UnrolledAdjoint`, never meets a NaN in the branch not taken.)
        system = jnp.where(mask & nonzero, gram + lam * eye, eye)
        y = jnp.linalg.solve(system, valid[:, 0].astype(dtype))
        total = jnp.sum(y)
        ok = nonzero & jnp.all(jnp.isfinite(y)) & (total > 0)
        alpha = jnp.where(ok, y, 0) / jnp.where(ok, total, 1)
        alpha = jnp.where(ok, alpha, jnp.arange(self.m) == slot).astype(dtype)
        x_new = self.beta * (alpha @ fs.astype(dtype)) + (1 - self.beta) * (
            alpha @ xs.astype(dtype)
        )
        z = state.unravel(x_new.astype(x.dtype))
        fz = fn(z, args)
        res = _residual(x_new.astype(x.dtype), ravel_pytree(fz)[0])
        better = res < state.best_res
        return AndersonState(
            z,
            fz,
            res,
            tree_where(better, z, state.best_z),
            tree_where(better, fz, state.best_fz),
            jnp.where(better, res, state.best_res),
            xs,
            fs,
            k + 1,
            restart,
            state.unravel,
        )

    def current(self, state: AndersonState) -> tuple[Z, Z]:
        return state.best_z, state.best_fz


def _residual(x: Array, f: Array) -> Array:
    """$\\|f - x\\|_2$, overflow-safe; `inf` when not finite, so it never counts as best.

    A statistic that only steers the iteration: no gradient (the norm's derivative at 0
    is infinite, and a zero cotangent times it would be NaN).
    """
    res = jax.lax.stop_gradient(tree_l2(f - x))
    return jnp.where(jnp.isfinite(res), res, jnp.inf)
