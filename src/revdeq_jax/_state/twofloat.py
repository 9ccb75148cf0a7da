"""A two-float state: float32 pairs holding about 48 bits, with no 64-bit types."""

from typing import Any, ClassVar

from jaxtyping import Array, Bool, Float, PyTree

from .. import _twofloat as tf
from .base import AbstractState, deviation_size, FLOAT_MISMATCH_RTOL, refuse_wide_z0


class TwoFloatState(AbstractState):
    r"""The coupled state as unevaluated float32 pairs: `state_dtype="float32x2"`.

    Each value is $x_{hi} + x_{lo}$ with about 48 significant bits, updated with
    error-free TwoSum/TwoProduct transformations (Dekker 1971) built from float32 adds and
    multiplies only, so it needs no 64-bit types: the choice for TPUs and GPUs without
    fast float64. About as exact as a float64 state for a few steps, a little less at
    depth; like it, approximate (see [`revdeq_jax.FloatState`][]). `fn` runs in the dtype
    of `z0`, which must be at most 32-bit.

    The backward pass flags a reconstruction whose relative deviation from `z0` exceeds
    `1e-3` as a mismatch (see [`revdeq_jax.FloatState`][]).
    """

    differentiable: ClassVar[bool] = True

    def check(self, z0: PyTree[Array]) -> None:
        refuse_wide_z0(
            z0,
            lambda dtype: (
                '`state_dtype="float32x2"` holds about 48 bits, fewer than the '
                f"dtype {dtype} of `z0`: the solver state would lose precision that `fn` has. "
                "Use `state_dtype=None` for a float64 model."
            ),
        )

    def is_leaf(self, x: Any) -> bool:
        return isinstance(x, tf.TwoFloat)

    def encode(self, z0: Array) -> tf.TwoFloat:
        return tf.from_float(z0)

    def decode(self, x: tf.TwoFloat, dtype: Any) -> Array:
        return tf.to_float(x, dtype)

    def update(self, x: tf.TwoFloat, f: Array, beta: float) -> tf.TwoFloat:
        return tf.add(tf.scale(1 - beta, x), tf.scale_float(beta, f))

    def invert(self, x: tf.TwoFloat, f: Array, beta: float) -> tf.TwoFloat:
        return tf.divide(tf.add(x, tf.neg(tf.scale_float(beta, f))), 1 - beta)

    def deviation(self, x: tf.TwoFloat, z0: Array) -> Float[Array, "*shape"]:
        return tf.sub_float(x, z0)

    def mismatch(self, x: tf.TwoFloat, z0: Array, rtol: float | None) -> Bool[Array, ""]:
        if rtol is None:
            rtol = FLOAT_MISMATCH_RTOL
        return ~(deviation_size(self.deviation(x, z0), z0)[1] <= rtol)
