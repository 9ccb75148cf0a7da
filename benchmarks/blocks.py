"""The three equilibrium blocks the adjoint benchmark runs (`f(z, x) -> z`, unbatched).

Defined here rather than imported from `tests/` so the benchmark does not depend on test
code. They are the blocks of the paper at benchmark sizes: a transformer layer (eq. 7,
post-norm), the convolutional residual block (eq. 8) and a contractive MLP.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


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


class AttentionBlock(eqx.Module):
    """`h = LN(z + x + Attn(z + x))`, `f = LN(h + MLP(h))` on a `(seq, dim)` sequence
    (causal self-attention, GELU MLP of width `2 * dim`)."""

    attn: eqx.nn.MultiheadAttention
    ln1: eqx.nn.LayerNorm
    ln2: eqx.nn.LayerNorm
    mlp1: eqx.nn.Linear
    mlp2: eqx.nn.Linear

    def __init__(self, dim: int, heads: int, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k1)
        self.ln1 = eqx.nn.LayerNorm(dim)
        self.ln2 = eqx.nn.LayerNorm(dim)
        self.mlp1 = eqx.nn.Linear(dim, 2 * dim, key=k2)
        self.mlp2 = eqx.nn.Linear(2 * dim, dim, key=k3)

    def __call__(self, z, x):
        u = z + x
        seq = u.shape[0]
        mask = jnp.tril(jnp.ones((seq, seq), bool))
        h = jax.vmap(self.ln1)(u + self.attn(u, u, u, mask=mask))
        m = jax.vmap(self.mlp2)(jax.nn.gelu(jax.vmap(self.mlp1)(h)))
        return jax.vmap(self.ln2)(h + m)


class GroupNorm(eqx.Module):
    """GroupNorm over a channels-last `(..., C)` array (statistics over all but groups)."""

    weight: jax.Array
    bias: jax.Array
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, groups: int, channels: int):
        self.weight = jnp.ones((channels,))
        self.bias = jnp.zeros((channels,))
        self.groups = groups

    def __call__(self, x):
        c = x.shape[-1]
        g = x.reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(i for i in range(g.ndim) if i != g.ndim - 2)
        mean = jnp.mean(g, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        return g.reshape(x.shape) * self.weight + self.bias


def conv3x3(z, w):
    """'Same' 3x3 convolution of one channels-last `(H, W, C)` image with an `HWIO`
    kernel, as one `lax.conv_general_dilated`."""
    out = jax.lax.conv_general_dilated(
        z[None], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return out[0]


class ConvBlock(eqx.Module):
    """Eq. 8: `f(z, x) = GN(ReLU(z + GN(x + W2 * ReLU(GN(W1 * z)))))` on one
    channels-last `(H, W, C)` image; 3x3 convolutions without bias, width expansion
    `width`, GroupNorm with `groups` groups.

    Channels-last because on XLA:CPU a channels-first convolution (`eqx.nn.Conv2d`, see
    `ConvBlockNCHW`) inside a `lax.while_loop`/`scan` body runs many times slower than at
    the top level of a program (the benchmark measures it separately), which would make
    every loop-based adjoint's time a measurement of that lowering.
    """

    w1: jax.Array
    w2: jax.Array
    gn1: GroupNorm
    gn2: GroupNorm
    gn3: GroupNorm

    def __init__(self, channels: int, *, key, width: int = 2, groups: int = 4):
        k1, k2 = jax.random.split(key)
        hidden = width * channels
        lim1 = 1 / math.sqrt(9 * channels)
        lim2 = 1 / math.sqrt(9 * hidden)
        self.w1 = jax.random.uniform(k1, (3, 3, channels, hidden), minval=-lim1, maxval=lim1)
        self.w2 = jax.random.uniform(k2, (3, 3, hidden, channels), minval=-lim2, maxval=lim2)
        self.gn1 = GroupNorm(groups, hidden)
        self.gn2 = GroupNorm(groups, channels)
        self.gn3 = GroupNorm(groups, channels)

    def __call__(self, z, x):
        h = jax.nn.relu(self.gn1(conv3x3(z, self.w1)))
        h = self.gn2(x + conv3x3(h, self.w2))
        return self.gn3(jax.nn.relu(z + h))


class ConvBlockNCHW(eqx.Module):
    """The same block written the usual Equinox way, channels-first `(C, H, W)` with
    `eqx.nn.Conv2d`/`eqx.nn.GroupNorm` (as `revdeq_jax.nn.ConvResidualLayer` is): only
    used to measure the loop penalty."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    gn1: eqx.nn.GroupNorm
    gn2: eqx.nn.GroupNorm
    gn3: eqx.nn.GroupNorm

    def __init__(self, channels: int, *, key, width: int = 2, groups: int = 4):
        k1, k2 = jax.random.split(key)
        hidden = width * channels
        self.conv1 = eqx.nn.Conv2d(channels, hidden, 3, padding=1, use_bias=False, key=k1)
        self.conv2 = eqx.nn.Conv2d(hidden, channels, 3, padding=1, use_bias=False, key=k2)
        self.gn1 = eqx.nn.GroupNorm(groups, hidden)
        self.gn2 = eqx.nn.GroupNorm(groups, channels)
        self.gn3 = eqx.nn.GroupNorm(groups, channels)

    def __call__(self, z, x):
        h = jax.nn.relu(self.gn1(self.conv1(z)))
        h = self.gn2(x + self.conv2(h))
        return self.gn3(jax.nn.relu(z + h))


# name -> (description, constructor(key) -> block, shape of one example)
BLOCKS = {
    "attention": (
        "transformer layer, dim 64, 4 heads, seq 32",
        lambda key: AttentionBlock(64, 4, key=key),
        (32, 64),
    ),
    "conv": (
        "conv + GroupNorm (eq. 8), 16 channels, width 2, 4 groups, 8x8, NHWC",
        lambda key: ConvBlock(16, key=key),
        (8, 8, 16),
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


def cast_floats(tree, dtype):
    """Casts every floating array leaf of `tree` to `dtype`."""
    return jtu.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)
