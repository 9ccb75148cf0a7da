"""Shared test blocks and comparisons."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import revdeq_jax as rdeq


class MLPBlock(eqx.Module):
    """f(z, x) = W2 tanh(W1 z + x), scaled to be a contraction."""

    w1: jax.Array
    w2: jax.Array

    def __init__(self, dim, *, key, dtype=jnp.float32, scale=0.9):
        k1, k2 = jax.random.split(key)
        self.w1 = (jax.random.normal(k1, (dim, dim)) / jnp.sqrt(dim)).astype(dtype)
        w2 = jax.random.normal(k2, (dim, dim)) / jnp.sqrt(dim)
        self.w2 = (
            scale * w2 / jnp.linalg.norm(w2, 2) / jnp.linalg.norm(self.w1.astype(jnp.float32), 2)
        ).astype(dtype)

    def __call__(self, z, x):
        return self.w2 @ jnp.tanh(self.w1 @ z + x)


class AttentionBlock(eqx.Module):
    """h = LN(z + x + Attn(z + x)); out = LN(h + MLP(h)) on a (seq, dim) sequence."""

    attn: eqx.nn.MultiheadAttention
    ln1: eqx.nn.LayerNorm
    ln2: eqx.nn.LayerNorm
    mlp1: eqx.nn.Linear
    mlp2: eqx.nn.Linear

    def __init__(self, dim, heads, *, key, dtype=jnp.float32):
        k1, k2, k3 = jax.random.split(key, 3)
        self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k1, dtype=dtype)
        self.ln1 = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.ln2 = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.mlp1 = eqx.nn.Linear(dim, 2 * dim, key=k2, dtype=dtype)
        self.mlp2 = eqx.nn.Linear(2 * dim, dim, key=k3, dtype=dtype)

    def __call__(self, z, x):
        u = z + x
        seq = u.shape[0]
        mask = jnp.tril(jnp.ones((seq, seq), bool))
        h = jax.vmap(self.ln1)(u + self.attn(u, u, u, mask=mask))
        m = jax.vmap(self.mlp2)(jax.nn.gelu(jax.vmap(self.mlp1)(h)))
        return jax.vmap(self.ln2)(h + m)


class ConvBlock(eqx.Module):
    """Eq. 8: GN(ReLU(z + GN(x + W2 * ReLU(GN(W1 * z))))) on a (C, H, W) image."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    gn1: eqx.nn.GroupNorm
    gn2: eqx.nn.GroupNorm
    gn3: eqx.nn.GroupNorm

    def __init__(self, channels, *, key, dtype=jnp.float32, width=2, groups=4):
        k1, k2 = jax.random.split(key)
        hidden = width * channels
        self.conv1 = eqx.nn.Conv2d(channels, hidden, 3, padding=1, key=k1, dtype=dtype)
        self.conv2 = eqx.nn.Conv2d(hidden, channels, 3, padding=1, key=k2, dtype=dtype)
        self.gn1 = eqx.nn.GroupNorm(groups, hidden, dtype=dtype)
        self.gn2 = eqx.nn.GroupNorm(groups, channels, dtype=dtype)
        self.gn3 = eqx.nn.GroupNorm(groups, channels, dtype=dtype)

    def __call__(self, z, x):
        h = jax.nn.relu(self.gn1(self.conv1(z)))
        h = self.gn2(x + self.conv2(h))
        return self.gn3(jax.nn.relu(z + h))


def make_block(name, *, key, dtype):
    """A block and an input of the matching shape."""
    kb, kx = jax.random.split(key)
    if name == "mlp":
        return MLPBlock(16, key=kb, dtype=dtype), jax.random.normal(kx, (16,), dtype)
    if name == "attention":
        block = AttentionBlock(16, 2, key=kb, dtype=dtype)
        return block, jax.random.normal(kx, (6, 16), dtype)
    if name == "conv":
        block = ConvBlock(8, key=kb, dtype=dtype)
        return block, jax.random.normal(kx, (8, 6, 6), dtype)
    raise ValueError(name)


def cast_floats(tree, dtype):
    return jtu.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def tree_rel_error(a, b) -> float:
    """max over leaves of ||a - b|| / ||b|| (b is the reference), in float64 numpy."""
    errs = []
    for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True):
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        den = max(np.linalg.norm(y), 1e-300)
        errs.append(np.linalg.norm(x - y) / den)
    return max(errs)


class ReportRecorder:
    """A `ReversibleAdjoint(report=...)` hook that keeps every report it is given."""

    def __init__(self):
        self.reports = []

    def __call__(self, report):
        self.reports.append({k: np.asarray(v) for k, v in report.items()})

    def stacked(self):
        """The reports so far, stacked (under `vmap` the hook is called once per
        example)."""
        jax.effects_barrier()
        assert self.reports
        return {k: np.stack([r[k] for r in self.reports]) for k in self.reports[0]}


def float64_unrolled(grads, block, xs, beta: float, steps: int):
    """The float64 unrolled reference gradient: `grads(block, xs, solver, adjoint, steps)`
    with the block and inputs in float64, a float64 reversible state and plain autodiff
    through the stored loop (`UnrolledAdjoint`), as numpy arrays."""
    with jax.enable_x64(True):
        g = grads(
            cast_floats(block, jnp.float64),
            xs.astype(jnp.float64),
            rdeq.Reversible(beta, state_dtype=None),
            rdeq.UnrolledAdjoint(),
            steps,
        )
        return jax.tree.map(np.asarray, g)
