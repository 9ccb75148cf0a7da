"""Decoder-only language models for WikiText: the RevDEQ transformer and an explicit baseline.

`DEQTransformerLM`: token + position embeddings `x`, ONE equilibrium layer
`z* = f(z*, x)` (`revdeq_jax.nn.EquilibriumTransformerLayer`, paper eq. 7) solved by
`rdeq.DEQ` with any solver/adjoint of the core library, final LayerNorm and a linear head.
The same class gives the paper's models by choice of solver and adjoint:

    RevDEQ          Reversible(beta=0.5)  + ReversibleAdjoint()     (exact gradient, O(1) memory)
    DEQ-IFT         Anderson() / Broyden() + ImplicitAdjoint()     (classic implicit gradient)

`ExplicitTransformerLM`: the same embeddings and head with `num_layers` distinct post-LN
transformer blocks (`layer.block`) stacked: the explicit transformer baseline.

Both act on ONE sequence of token ids and return `(logits, stats)`; `lm_loss` vmaps them over
a batch. Variational dropout: one mask per sequence and forward pass, sampled outside the
solver and passed to the layer with `x`, so every solver iteration sees the same function.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

import revdeq_jax as rdeq
from experiments.common.solvers import DTYPES, make_adjoint, make_solver
from revdeq_jax.nn import EquilibriumTransformerLayer, VariationalDropout

from .configs import Config
from .data import PADDED_VOCAB_SIZE


# ---------------------------------------------------------------------------------------------
# Shared parts


class Embedding(eqx.Module):
    """Token + learned position embeddings of one sequence."""

    tokens: Float[Array, "vocab dim"]
    positions: Float[Array, "max_seq dim"]

    def __init__(self, vocab: int, max_seq: int, dim: int, *, key: PRNGKeyArray, dtype):
        k1, k2 = jax.random.split(key)
        self.tokens = jax.random.normal(k1, (vocab, dim), dtype)
        self.positions = 0.1 * jax.random.normal(k2, (max_seq, dim), dtype)

    def __call__(self, ids: Int[Array, " seq"]) -> Float[Array, "seq dim"]:
        return self.tokens[ids] + self.positions[: ids.shape[0]]


class Head(eqx.Module):
    """Final LayerNorm and linear map to the (padded) vocabulary, computed in `compute_dtype`;
    logits returned in float32."""

    norm: eqx.nn.LayerNorm
    weight: Float[Array, "vocab dim"]
    compute_dtype: object = eqx.field(static=True)

    def __init__(self, vocab: int, dim: int, *, key: PRNGKeyArray, dtype, compute_dtype):
        self.norm = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.weight = 0.02 * jax.random.normal(key, (vocab, dim), dtype)
        self.compute_dtype = compute_dtype

    def __call__(self, z: Float[Array, "seq dim"]) -> Float[Array, "seq vocab"]:
        h = jax.vmap(self.norm)(z)
        dtype = self.compute_dtype or h.dtype
        logits = h.astype(dtype) @ self.weight.astype(dtype).T
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Models


class DEQTransformerLM(eqx.Module):
    """Token ids `(seq,)` -> logits `(seq, vocab)` through one equilibrium transformer layer."""

    embed: Embedding
    deq: rdeq.DEQ
    head: Head
    dropout: float = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, config: Config, *, key: PRNGKeyArray):
        dtype, compute = DTYPES[config.param_dtype], DTYPES[config.compute_dtype]
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = Embedding(PADDED_VOCAB_SIZE, config.seq_len, config.dim, key=k1, dtype=dtype)
        layer = EquilibriumTransformerLayer(
            config.dim,
            config.num_heads,
            config.mlp_ratio,
            key=k2,
            dtype=dtype,
            compute_dtype=None if compute == dtype else compute,
        )
        self.deq = rdeq.DEQ(
            layer,
            solver=make_solver(config),
            adjoint=make_adjoint(config),
            max_steps=config.max_steps,
            tol=config.tol,
        )
        self.head = Head(
            PADDED_VOCAB_SIZE,
            config.dim,
            key=k3,
            dtype=dtype,
            compute_dtype=None if compute == dtype else compute,
        )
        self.dropout = config.dropout
        self.dim = config.dim

    def __call__(
        self,
        ids: Int[Array, " seq"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "seq vocab"], dict[str, Array]]:
        x = self.embed(ids)
        mask = VariationalDropout(self.dropout).mask(
            (2, self.dim), key=key, inference=inference, dtype=x.dtype
        )
        z, sol = self.deq((x, mask), jnp.zeros_like(x), return_solution=True)
        stats = {
            "nfe": sol.nfe,
            "residual": sol.residual,
            "solver_steps": sol.num_steps,
        }
        return self.head(z), stats


class ExplicitTransformerLM(eqx.Module):
    """The explicit baseline: `num_layers` distinct post-LN transformer blocks, same parts."""

    embed: Embedding
    layers: tuple[EquilibriumTransformerLayer, ...]
    head: Head
    dropout: float = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, config: Config, *, key: PRNGKeyArray):
        dtype, compute = DTYPES[config.param_dtype], DTYPES[config.compute_dtype]
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = Embedding(PADDED_VOCAB_SIZE, config.seq_len, config.dim, key=k1, dtype=dtype)
        self.layers = tuple(
            EquilibriumTransformerLayer(
                config.dim,
                config.num_heads,
                config.mlp_ratio,
                key=k,
                dtype=dtype,
                compute_dtype=None if compute == dtype else compute,
            )
            for k in jax.random.split(k2, config.num_layers)
        )
        self.head = Head(
            PADDED_VOCAB_SIZE,
            config.dim,
            key=k3,
            dtype=dtype,
            compute_dtype=None if compute == dtype else compute,
        )
        self.dropout = config.dropout
        self.dim = config.dim

    def __call__(
        self,
        ids: Int[Array, " seq"],
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "seq vocab"], dict[str, Array]]:
        z = self.embed(ids)
        dropout = VariationalDropout(self.dropout)
        keys = (
            jax.random.split(key, len(self.layers))
            if key is not None
            else [None] * len(self.layers)
        )
        for layer, k in zip(self.layers, keys):
            z = layer.block(
                z,
                dropout.mask((2, self.dim), key=k, inference=inference, dtype=z.dtype),
            )
        return self.head(z), {"nfe": jnp.asarray(len(self.layers), jnp.int32)}


def make_model(config: Config, *, key: PRNGKeyArray) -> DEQTransformerLM | ExplicitTransformerLM:
    if config.model == "deq":
        return DEQTransformerLM(config, key=key)
    if config.model == "explicit":
        return ExplicitTransformerLM(config, key=key)
    raise ValueError(f"unknown model {config.model!r}; choose from ['deq', 'explicit']")


# ---------------------------------------------------------------------------------------------
# Loss


def lm_loss(
    model: DEQTransformerLM | ExplicitTransformerLM,
    inputs: Int[Array, "batch seq"],
    targets: Int[Array, "batch seq"],
    weights: Float[Array, "batch seq"] | None = None,
    *,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Mean next-token cross-entropy (nats) over the weighted targets, and batch statistics.

    Returns `(loss, stats)` with stats `nll_sum`, `num_tokens` (to pool several batches
    exactly) and the solver statistics averaged over the batch's sequences.
    """
    keys = None if key is None else jax.random.split(key, inputs.shape[0])
    logits, stats = jax.vmap(lambda ids, k: model(ids, key=k, inference=inference))(inputs, keys)
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
    if weights is None:
        weights = jnp.ones(nll.shape, nll.dtype)
    nll_sum = jnp.sum(nll * weights)
    num_tokens = jnp.sum(weights)
    loss = nll_sum / num_tokens
    stats = {name: jnp.mean(value.astype(jnp.float32)) for name, value in stats.items()}
    return loss, {"nll_sum": nll_sum, "num_tokens": num_tokens, **stats}
