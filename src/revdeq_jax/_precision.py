"""Precision of the solver's own state, separate from the precision of `fn`.

The reversible solver's inverse step loses the low bits that its forward step rounded
away, so the paper keeps the coupled state `(y, z)` and its add/sub/scale arithmetic in
float64 while `fn` runs in float32 or lower. JAX decides whether 64-bit types exist with
a global flag; here it is switched on *only* around the solver's own arithmetic, with the
scoped `jax.enable_x64` context manager, and switched back to the caller's setting every
time `fn` is called. Nothing global is changed.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._exact import ExactState


_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def x64_enabled() -> bool:
    """Whether 64-bit types are currently enabled (globally or by a scope)."""
    return bool(jax.config.read("jax_enable_x64"))


TWO_FLOAT = "float32x2"
EXACT = "exact"
AUTO = "auto"


def is_two_float(state_dtype: Any) -> bool:
    return isinstance(state_dtype, str) and state_dtype == TWO_FLOAT


def is_exact(state_dtype: Any) -> bool:
    return isinstance(state_dtype, ExactState)


def is_auto(state_dtype: Any) -> bool:
    return isinstance(state_dtype, str) and state_dtype == AUTO


def check_state_dtype(state_dtype: Any) -> Any:
    """Normalises `state_dtype` (`None` = the dtype of `z0`) and checks it is a float.

    Besides a floating dtype, the string `"float32x2"` selects a two-float state, and
    `"exact"` (or an `ExactState`) the bit-exact fixed-point state.
    """
    if (
        state_dtype is None
        or is_two_float(state_dtype)
        or is_exact(state_dtype)
        or is_auto(state_dtype)
    ):
        return state_dtype
    if isinstance(state_dtype, str) and state_dtype == EXACT:
        return ExactState()
    try:
        dtype = jnp.dtype(state_dtype)
    except TypeError as e:
        raise ValueError(
            f"`state_dtype={state_dtype!r}` is not a dtype. Use `None` (the dtype of "
            '`z0`), `jnp.float32`, `jnp.float64`, `"float32x2"` (two-float), `"exact"` '
            '(bit-exact fixed point) or `"auto"`.'
        ) from e
    if dtype not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise ValueError(
            f"`state_dtype={dtype}` cannot hold a solver state: it must be a real "
            "floating dtype (`jnp.float32` or `jnp.float64`)."
        )
    return dtype


def check_state_dtype_for(state_dtype: Any, z0: PyTree) -> None:
    """Trace-time checks of a state dtype against the initial state `z0`."""
    if state_dtype is None:
        return
    if is_exact(state_dtype):
        bits = 64
    elif is_two_float(state_dtype):
        bits = 48
    else:
        bits = jnp.finfo(state_dtype).bits
    for leaf in jax.tree_util.tree_leaves(z0):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(
                f"`state_dtype={state_dtype}` was requested but `z0` has a leaf of "
                f"dtype {leaf.dtype}; mixed precision needs real floating `z0` leaves."
            )
        if jnp.finfo(leaf.dtype).bits > bits:
            raise ValueError(
                f"`state_dtype={state_dtype}` is narrower than the dtype {leaf.dtype} of "
                "`z0`: the solver state would lose precision that `fn` has. Use "
                "`state_dtype=None` or a wider dtype."
            )
    if bits == 64 and not is_exact(state_dtype):
        backend = jax.default_backend()
        if backend not in ("cpu", "gpu", "cuda", "rocm", "tpu"):
            raise ValueError(
                f"`state_dtype=float64` cannot be honoured on the `{backend}` backend, "
                'which has no 64-bit floats. Use `state_dtype="float32x2"` (two-float '
                "arithmetic in float32 pairs, ~48 bits) instead."
            )


@contextlib.contextmanager
def state_scope(state_dtype: Any) -> Iterator[None]:
    """Enables 64-bit types for the enclosed code iff the state needs them."""
    if is_exact(state_dtype):
        wide = True  # int64 fixed point
    else:
        wide = (
            state_dtype is not None
            and not is_two_float(state_dtype)
            and jnp.finfo(state_dtype).bits == 64
        )
    if wide and not x64_enabled():
        with jax.enable_x64(True):
            yield
    else:
        yield


class UserFn(eqx.Module):
    """Calls the user's `fn` with the caller's x64 setting, whatever scope it runs in.

    Inside the solver's float64 scope, `jnp.zeros(n)` in user code would otherwise
    silently become float64 and promote the whole layer.
    """

    fn: Callable
    x64: bool = eqx.field(static=True)

    def __call__(self, z, args):
        with jax.enable_x64(self.x64):
            return self.fn(z, args)
