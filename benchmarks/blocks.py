"""The equilibrium blocks the benchmarks run (`f(z, x) -> z`, one example).

The paper's two blocks are the library's own (`revdeq_jax.nn`), at benchmark sizes: the
transformer layer of eq. 7 and the convolutional residual layer of eq. 8 (channels-first,
as `eqx.nn.Conv2d` is). The third, a contractive MLP, has no counterpart in the library
and is defined here.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import revdeq_jax as rdeq


class MLPBlock(eqx.Module):
    """`f(z, x) = W2 tanh(W1 z + x)`, scaled so that it is a contraction (constant 0.9)."""

    w1: jax.Array
    w2: jax.Array

    def __init__(self, dim: int, *, key, scale: float = 0.9):
        k1, k2 = jax.random.split(key)
        self.w1 = jax.random.normal(k1, (dim, dim)) / jnp.sqrt(dim)
        w2 = jax.random.normal(k2, (dim, dim)) / jnp.sqrt(dim)
        norms = jnp.linalg.norm(w2, 2) * jnp.linalg.norm(self.w1, 2)
        self.w2 = scale * w2 / norms

    def __call__(self, z, x):
        return self.w2 @ jnp.tanh(self.w1 @ z + x)


# name -> (description, constructor(key) -> block, shape of one example)
BLOCKS = {
    "attention": (
        "`nn.EquilibriumTransformerLayer` (eq. 7): dim 64, 4 heads, MLP ratio 2, seq 32",
        lambda key: rdeq.nn.EquilibriumTransformerLayer(64, 4, 2, key=key),
        (32, 64),
    ),
    "conv": (
        "`nn.ConvResidualLayer` (eq. 8): 16 channels, width 2, 4 groups, 8x8, channels-first",
        lambda key: rdeq.nn.ConvResidualLayer(16, 2, groups=4, key=key),
        (16, 8, 8),
    ),
    # A narrow attention layer on a short sequence: under a per-example `jax.vmap` XLA
    # compiles its backward re-evaluation to other bits than the forward's (measured on
    # CPU), the case the exact state's lattice is for.
    "attention-small": (
        "`nn.EquilibriumTransformerLayer` (eq. 7): dim 16, 2 heads, MLP ratio 2, seq 6",
        lambda key: rdeq.nn.EquilibriumTransformerLayer(16, 2, 2, key=key),
        (6, 16),
    ),
    "mlp": (
        "contractive MLP, dim 256",
        lambda key: MLPBlock(256, key=key),
        (256,),
    ),
}


def make(name: str, batch: int, *, key):
    """The block, a batch of inputs `x` and a fixed regression target, all float32."""
    _, ctor, shape = BLOCKS[name]
    kb, kx, kt = jax.random.split(key, 3)
    block = ctor(kb)
    xs = jax.random.normal(kx, (batch, *shape), jnp.float32)
    target = jax.random.normal(kt, (batch, *shape), jnp.float32)
    return block, xs, target
