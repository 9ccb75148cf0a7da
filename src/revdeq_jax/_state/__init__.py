"""State arithmetic of the reversible solver: one strategy object per precision."""

from typing import Any

import jax.numpy as jnp

from .auto import AutoState as AutoState
from .base import AbstractState as AbstractState, x64_enabled as x64_enabled
from .exact import Exact as Exact, ExactState as ExactState, rational_beta as rational_beta
from .floating import FloatState as FloatState
from .twofloat import TwoFloatState as TwoFloatState


def as_state(state_dtype: Any) -> AbstractState:
    """Converts `Reversible(state_dtype=...)` to a state strategy.

    `None` (the dtype of `z0`) and floating dtypes give [`revdeq_jax.FloatState`][],
    `"float32x2"` [`revdeq_jax.TwoFloatState`][], `"exact"` [`revdeq_jax.ExactState`][],
    `"auto"` [`revdeq_jax.AutoState`][]; a state object is kept as it is.
    """
    if isinstance(state_dtype, AbstractState):
        return state_dtype
    if isinstance(state_dtype, str):
        named = {"float32x2": TwoFloatState, "exact": ExactState, "auto": AutoState}
        if state_dtype in named:
            return named[state_dtype]()
        try:
            jnp.dtype(state_dtype)
        except TypeError:
            raise ValueError(
                f"`state_dtype={state_dtype!r}` is not a known state. Use `None` (the "
                'dtype of `z0`), `jnp.float32`, `jnp.float64`, `"float32x2"` (two-float), '
                '`"exact"` (bit-exact fixed point), `"auto"`, or a state object such as '
                "`rdeq.ExactState()`."
            ) from None
    return FloatState(state_dtype)
