"""A floating-point state: the dtype of `z0`, or a wider one (the paper's float64 recipe)."""

import contextlib
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, PyTree

from .base import AbstractState, deviation_size, FLOAT_MISMATCH_RTOL, x64_scope


_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def _float_dtype(dtype: Any) -> Any:
    if dtype is None:
        return None
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(
            f"`state_dtype={dtype!r}` is not a dtype. Use `None` (the dtype of `z0`), "
            '`jnp.float32`, `jnp.float64`, `"float32x2"` (two-float), `"exact"` '
            '(bit-exact fixed point) or `"auto"`.'
        ) from e
    if dtype not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise ValueError(
            f"`state_dtype={dtype}` cannot hold a solver state: it must be a real "
            "floating dtype (`jnp.float32` or `jnp.float64`)."
        )
    return dtype


class FloatState(AbstractState):
    r"""The coupled state in a floating dtype: `Reversible(beta, state_dtype=jnp.float64)`.

    `dtype=None` keeps each leaf in the dtype of `z0` (what `Reversible(beta)` does). A
    wider dtype holds the state and the solver's add/sub/scale arithmetic in it while
    `fn` still runs in the dtype of `z0`; for `jnp.float64` the 64-bit types are switched
    on only around that arithmetic (`jax.enable_x64` as a scoped context), never
    globally.

    !!! warning

        Reversal is approximate: the inverse step divides by $1 - \beta$, so rounding
        errors grow by about $1/|1-\beta|$ times the growth of $f$'s Jacobian at every
        step, and the re-evaluation of `fn` on the backward pass (a separately compiled
        program) may differ from the forward's by an ulp, which is amplified the same
        way. A float64 state with a float32 `fn` reconstructs well for a few steps
        (bit-exactly for many at `beta = 0.5`), then drifts. For guaranteed exactness use
        [`revdeq_jax.ExactState`][].

    The backward pass flags a reconstruction whose relative deviation from `z0` exceeds
    `1e-3` as a mismatch (see [`revdeq_jax.ReversibleAdjoint`][]). The deviation of the
    initial state is the largest of the trajectory and overstates the gradient's error on
    contractive layers (measured: float64 state, float32 attention block, `beta = 0.8`, 8
    steps: relative deviation 2e-5, gradient error 4.5e-7), hence the loose threshold: it
    catches a reconstruction that has come apart, not every lost digit.

    **Arguments:**

    - `dtype`: `None` (the dtype of `z0`) or a floating dtype at least as wide as `z0`.
    """

    dtype: Any = eqx.field(default=None, static=True, converter=_float_dtype)

    differentiable: ClassVar[bool] = True

    def check(self, z0: PyTree[Array]) -> None:
        if self.dtype is None:
            return
        bits = jnp.finfo(self.dtype).bits
        for leaf in jtu.tree_leaves(z0):
            if jnp.finfo(leaf.dtype).bits > bits:
                raise ValueError(
                    f"`state_dtype={self.dtype}` is narrower than the dtype {leaf.dtype} "
                    "of `z0`: the solver state would lose precision that `fn` has. Use "
                    "`state_dtype=None` or a wider dtype."
                )
        if bits == 64 and jax.default_backend() not in ("cpu", "gpu", "cuda", "rocm", "tpu"):
            raise ValueError(
                f"`state_dtype=float64` cannot be honoured on the `{jax.default_backend()}` "
                'backend, which has no 64-bit floats. Use `state_dtype="float32x2"` or '
                '`state_dtype="exact"` instead.'
            )

    def scope(self) -> contextlib.AbstractContextManager:
        if self.dtype is not None and jnp.finfo(self.dtype).bits == 64:
            return x64_scope()
        return contextlib.nullcontext()

    def encode(self, z0: Array) -> Array:
        return z0 if self.dtype is None else z0.astype(self.dtype)

    def decode(self, x: Array, dtype: Any) -> Array:
        return x.astype(dtype)

    def update(self, x: Array, f: Array, beta: float) -> Array:
        return (1 - beta) * x + beta * f.astype(x.dtype)

    def invert(self, x: Array, f: Array, beta: float) -> Array:
        # Upcast f before scaling, exactly as the forward step does.
        return (x - beta * f.astype(x.dtype)) / jnp.asarray(1 - beta, x.dtype)

    def deviation(self, x: Array, z0: Array) -> Float[Array, "*shape"]:
        return x - z0.astype(x.dtype)

    def mismatch(self, x: Array, z0: Array, rtol: float | None) -> Bool[Array, ""]:
        if rtol is None:
            rtol = FLOAT_MISMATCH_RTOL
        return ~(deviation_size(self.deviation(x, z0), z0)[1] <= rtol)

    def cotangent_dtype(self, dtype: Any) -> Any:
        return dtype if self.dtype is None else self.dtype
