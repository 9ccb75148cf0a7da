"""Anderson acceleration (type-II Anderson mixing)."""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree

from .._custom_types import Args, Fn, Z
from .base import AbstractSolver


class AndersonState(eqx.Module):
    z: PyTree
    fz: PyTree
    xs: Float[Array, "m n"]  # past iterates
    fs: Float[Array, "m n"]  # f at past iterates
    k: Int[Array, ""]
    unravel: Callable = eqx.field(static=True)


class Anderson(AbstractSolver[AndersonState]):
    r"""Anderson acceleration with memory `m` and mixing `beta`.

    Keeps the last `m` iterates $x_i$ and values $f(x_i)$, picks weights $\alpha$ with
    $\sum_i \alpha_i = 1$ that minimise $\|\sum_i \alpha_i (f(x_i) - x_i)\|^2$ (plus a
    ridge of `ridge` times the largest squared residual, for stability), and steps to
    $\beta \sum_i \alpha_i f(x_i) + (1 - \beta) \sum_i \alpha_i x_i$. One evaluation of
    $f$ per step. The usual forward solver of classic DEQs; not reversible.

    The state is flattened into one vector per example, so all leaves of `z0` should
    share a dtype.
    """

    m: int = eqx.field(default=5, static=True)
    beta: float = 1.0
    ridge: float = 1e-4

    nfe_per_step: ClassVar[int] = 1

    def __check_init__(self):
        if self.m < 1:
            raise ValueError(f"`Anderson(m={self.m})`: the memory `m` must be >= 1.")
        if not 0 < self.beta <= 1:
            raise ValueError(f"`Anderson(beta={self.beta})`: `beta` must lie in (0, 1].")
        if self.ridge < 0:
            raise ValueError(f"`Anderson(ridge={self.ridge})` must be >= 0.")

    def init(self, fn: Fn, z0: Z, args: Args) -> AndersonState:
        fz = fn(z0, args)
        x, unravel = ravel_pytree(z0)
        xs = jnp.zeros((self.m, x.size), x.dtype)
        return AndersonState(z0, fz, xs, xs, jnp.zeros((), jnp.int32), unravel)

    def step(self, fn: Fn, state: AndersonState, args: Args) -> AndersonState:
        x, _ = ravel_pytree(state.z)
        f, _ = ravel_pytree(state.fz)
        slot = state.k % self.m
        xs = state.xs.at[slot].set(x)
        fs = state.fs.at[slot].set(f)
        valid = jnp.arange(self.m) < jnp.minimum(state.k + 1, self.m)
        g = jnp.where(valid[:, None], fs - xs, 0).astype(jnp.promote_types(x.dtype, jnp.float32))
        gram = g @ g.T
        scale = jnp.maximum(jnp.max(jnp.diag(gram)), jnp.finfo(gram.dtype).tiny)
        eye = jnp.eye(self.m, dtype=gram.dtype)
        # Unused slots get an identity row/column, so their weights solve to 0.
        gram = jnp.where(valid[:, None] & valid[None, :], gram + self.ridge * scale * eye, eye)
        ones = valid.astype(gram.dtype)
        h = jnp.block([[jnp.zeros((1, 1), gram.dtype), ones[None, :]], [ones[:, None], gram]])
        rhs = jnp.zeros(self.m + 1, gram.dtype).at[0].set(1)
        alpha = jnp.linalg.solve(h, rhs)[1:]
        alpha = jnp.where(valid, alpha, 0)
        x_new = self.beta * (alpha @ fs) + (1 - self.beta) * (alpha @ xs)
        z = state.unravel(x_new.astype(x.dtype))
        return AndersonState(z, fn(z, args), xs, fs, state.k + 1, state.unravel)

    def current(self, state: AndersonState) -> tuple[Z, Z]:
        return state.z, state.fz
