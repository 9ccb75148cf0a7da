"""Equilibrium blocks written for the exactness-guarantee tests, on purpose unlike the ones
in `helpers.py` (which the exact state was first tuned on): other normalisations, other
activations, other shapes, and layers whose re-evaluation inside `jax.vjp` is
deliberately a few ulps off their plain evaluation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _layer_norm(h, g, b, eps=1e-5):
    m = h.mean(-1, keepdims=True)
    var = ((h - m) ** 2).mean(-1, keepdims=True)
    return (h - m) * jax.lax.rsqrt(var + eps) * g[None] + b[None]


class CausalAttentionLN(eqx.Module):
    """Single-head causal self-attention with a residual and a hand-written LayerNorm on a
    (seq, width) sequence: `LN(u + softmax(mask(q k^T)) v W_o)`, `u = z + x`."""

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    g: jax.Array
    b: jax.Array

    def __init__(self, width, *, key):
        ks = jax.random.split(key, 4)
        s = 1 / np.sqrt(width)
        self.wq, self.wk, self.wv, self.wo = (jax.random.normal(k, (width, width)) * s for k in ks)
        self.g = jnp.full(width, 1.1)
        self.b = jnp.full(width, 0.05)

    def __call__(self, z, x):
        u = z + x
        q, k, v = u @ self.wq, u @ self.wk, u @ self.wv
        scores = q @ k.T / jnp.sqrt(q.shape[-1])
        n = scores.shape[0]
        scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -1e9)
        return _layer_norm(u + jax.nn.softmax(scores, -1) @ v @ self.wo, self.g, self.b)


class ConvGroupNorm(eqx.Module):
    """Eq. 8's shape with 8 channels in CHW, written independently of `helpers.ConvBlock`:
    `GN(ReLU(z + GN(x + W2 * ReLU(GN(W1 * z)))))`."""

    c1: eqx.nn.Conv2d
    c2: eqx.nn.Conv2d
    n1: eqx.nn.GroupNorm
    n2: eqx.nn.GroupNorm
    n3: eqx.nn.GroupNorm

    def __init__(self, channels, *, key):
        k1, k2 = jax.random.split(key)
        self.c1 = eqx.nn.Conv2d(channels, 2 * channels, 3, padding=1, key=k1)
        self.c2 = eqx.nn.Conv2d(2 * channels, channels, 3, padding=1, key=k2)
        self.n1 = eqx.nn.GroupNorm(4, 2 * channels)
        self.n2 = eqx.nn.GroupNorm(4, channels)
        self.n3 = eqx.nn.GroupNorm(4, channels)

    def __call__(self, z, x):
        h = jax.nn.relu(self.n1(self.c1(z)))
        return self.n3(jax.nn.relu(z + self.n2(x + self.c2(h))))


class GatedRMSMLP(eqx.Module):
    """A SwiGLU-style gated MLP with RMSNorm on a vector: `RMS(z + W3 (silu(W1 u) * W2 u))`,
    `u = RMS(z) + x`."""

    w1: jax.Array
    w2: jax.Array
    w3: jax.Array

    def __init__(self, width, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        s = 1 / np.sqrt(width)
        self.w1 = jax.random.normal(k1, (2 * width, width)) * s
        self.w2 = jax.random.normal(k2, (2 * width, width)) * s
        self.w3 = jax.random.normal(k3, (width, 2 * width)) * s / 2

    def __call__(self, z, x):
        def rms(h):
            return h * jax.lax.rsqrt(jnp.mean(h**2) + 1e-6)

        u = rms(z) + x
        return rms(z + self.w3 @ (jax.nn.silu(self.w1 @ u) * (self.w2 @ u)))


def ulp_shift(x, shift):
    """`x` moved `shift` float32 ulps away from zero (towards it for negative `shift`)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    moved = jax.lax.bitcast_convert_type(bits + shift.astype(jnp.int32), jnp.float32)
    return jnp.where(x == 0, x, moved)


def perturbed_in_vjp(fn, shifts):
    """`fn` whose value *inside `jax.vjp`* (the reversible backward pass's re-evaluation)
    is moved by `shifts(out)` ulps per element, while a plain call is exact: what another
    fusion of the same layer, or a GPU reduction in another order, does."""

    @jax.custom_vjp
    def bump(out):
        return out

    def bump_fwd(out):
        return ulp_shift(out, shifts(out)), None

    def bump_bwd(_, ct):
        return (ct,)

    bump.defvjp(bump_fwd, bump_bwd)
    return lambda z, x: bump(fn(z, x))


class TanhLayer(eqx.Module):
    """`tanh(W z + x)`, a contraction for the scale used."""

    w: jax.Array

    def __init__(self, width, *, key):
        self.w = jax.random.normal(key, (width, width)) * 0.8 / np.sqrt(width)

    def __call__(self, z, x):
        return jnp.tanh(self.w @ z + x)


class WideTanhMLP(eqx.Module):
    """`w2 @ tanh(w1 @ (z + x))`, width `d`, hidden `h`: the plainest DEQ layer, wide.
    Per-example under `vmap` its backward re-evaluation lands 7-14 ulps from the forward's
    value on CPU (widths 64 to 1024), past the 7.5 ulps of 4 guard bits."""

    w1: jax.Array
    w2: jax.Array

    def __init__(self, width, hidden, *, key):
        k1, k2 = jax.random.split(key)
        self.w1 = jax.random.normal(k1, (hidden, width)) / np.sqrt(width)
        self.w2 = 0.3 * jax.random.normal(k2, (width, hidden)) / np.sqrt(hidden)

    def __call__(self, z, x):
        return self.w2 @ jnp.tanh(self.w1 @ (z + x))


# Faults within the exact state's tolerance: a re-evaluation 1 and 4 ulps off, and random
# per-element shifts of up to 4 ulps (`perturbed_in_vjp`'s `shifts`).
ULP_SHIFTS = [
    pytest.param(lambda out: jnp.ones(out.shape, jnp.int32), id="+1ulp"),
    pytest.param(lambda out: jnp.full(out.shape, -4, jnp.int32), id="-4ulp"),
    pytest.param(
        lambda out: jax.random.randint(jax.random.key(7), out.shape, -4, 5),
        id="random-4..4ulp",
    ),
]
