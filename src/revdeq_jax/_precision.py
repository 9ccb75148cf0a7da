"""The user's `fn`, called with the caller's x64 setting whatever scope it runs in.

The solver's own arithmetic may run with 64-bit types switched on (a float64 or an exact
integer state, see `_state/`); `fn` must not notice. Inside that scope `jnp.zeros(n)` in
user code would otherwise silently become float64 and promote the whole layer.
"""

from collections.abc import Callable

import equinox as eqx
import jax


class UserFn(eqx.Module):
    """`fn(z, args)`, evaluated with 64-bit types as they were when it was given."""

    fn: Callable
    x64: bool = eqx.field(static=True)

    def __call__(self, z, args):
        with jax.enable_x64(self.x64):
            return self.fn(z, args)
