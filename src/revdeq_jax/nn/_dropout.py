"""Variational dropout for equilibrium layers."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, DTypeLike, Float, PRNGKeyArray


class VariationalDropout(eqx.Module):
    """Dropout with one mask per forward pass, fixed across all solver iterations.

    Ordinary dropout inside a fixed-point iteration draws a new mask at every call of
    `f`, so the iteration chases a moving target and has no fixed point. Variational
    ("locked") dropout, as in the DEQ transformer of Bai, Kolter & Koltun (2019), samples
    the mask once, *outside* the solver, and passes it in with the other arguments of `f`;
    every iteration (and, for reversible backpropagation, every reconstruction) then sees
    the same function.

    ```python
    dropout = VariationalDropout(p=0.1)
    mask = dropout.mask((2, dim), key=key)          # once per forward pass
    z = deq((x, mask), z0)                          # f(z, (x, mask)) applies dropout(h, mask)
    ```

    Masks are scaled by `1 / (1 - p)` (inverted dropout), so no rescaling is needed at
    inference, where the mask is all ones.
    """

    p: float = eqx.field(static=True)

    def __check_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"VariationalDropout needs 0 <= p < 1, got p={self.p}")

    def mask(
        self,
        shape: tuple[int, ...],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        dtype: DTypeLike = jnp.float32,
    ) -> Float[Array, "..."]:
        """Sample a mask of `shape`: entries 0 or `1/(1-p)`; all ones when `inference` or p=0."""
        if inference or self.p == 0.0:
            return jnp.ones(shape, dtype)
        if key is None:
            raise ValueError("VariationalDropout.mask needs a `key` when not in inference mode")
        keep = jax.random.bernoulli(key, 1.0 - self.p, shape)
        return keep.astype(dtype) / jnp.asarray(1.0 - self.p, dtype)

    def __call__(
        self, x: Float[Array, "..."], mask: Float[Array, "..."] | None
    ) -> Float[Array, "..."]:
        """Apply a mask from `self.mask` (broadcast against `x`); `None` is the identity."""
        if mask is None:
            return x
        return x * mask.astype(x.dtype)
