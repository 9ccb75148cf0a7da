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

The DEQ model also takes a runtime `step_budget` (one compiled evaluation serves an NFE sweep)
and, for Jacobian regularisation (`Config.jac_reg`, Bai, Koltun & Kolter 2021), a `jac_key`:
its stats then carry `rdeq.jacobian_penalty` of the layer at the fixed point `z*`.
"""

from __future__ import annotations

from typing import Any, TypeAlias

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


Ids: TypeAlias = Int[Array, " seq"]
Key: TypeAlias = PRNGKeyArray
Output: TypeAlias = tuple[Float[Array, "seq vocab"], dict[str, Array]]  # (logits, stats)


def _embed(config: Config, key: PRNGKeyArray) -> Embedding:
    dtype = DTYPES[config.param_dtype]
    return Embedding(PADDED_VOCAB_SIZE, config.seq_len, config.dim, key=key, dtype=dtype)


def _compute_dtype(config: Config):
    """The layer arithmetic's dtype where it differs from the parameters', else None."""
    dtype, compute = DTYPES[config.param_dtype], DTYPES[config.compute_dtype]
    return None if compute == dtype else compute


def _layer(config: Config, key: PRNGKeyArray) -> EquilibriumTransformerLayer:
    return EquilibriumTransformerLayer(
        config.dim,
        config.num_heads,
        config.mlp_ratio,
        key=key,
        dtype=DTYPES[config.param_dtype],
        compute_dtype=_compute_dtype(config),
    )


def _head(config: Config, key: PRNGKeyArray) -> Head:
    dtype = DTYPES[config.param_dtype]
    return Head(
        PADDED_VOCAB_SIZE, config.dim, key=key, dtype=dtype, compute_dtype=_compute_dtype(config)
    )


class _LM(eqx.Module):
    """The parts both models share: token and position embedding, head, dropout rate."""

    embed: Embedding
    head: Head
    dropout: float = eqx.field(static=True)
    dim: int = eqx.field(static=True)


class DEQTransformerLM(_LM):
    """Token ids `(seq,)` -> logits `(seq, vocab)` through one equilibrium transformer layer."""

    deq: rdeq.DEQ

    def __init__(self, config: Config, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = _embed(config, k1)
        layer = _layer(config, k2)
        self.deq = rdeq.DEQ(
            layer,
            solver=make_solver(config),
            adjoint=make_adjoint(config),
            max_steps=config.max_steps,
            tol=config.tol,
        )
        self.head = _head(config, k3)
        self.dropout = config.dropout
        self.dim = config.dim

    def __call__(
        self,
        ids: Ids,
        *,
        key: Key | None = None,
        inference: bool = False,
        step_budget: Int[Array, ""] | None = None,
        jac_key: Key | None = None,
        jac_probes: int = 1,
    ) -> Output:
        """`step_budget`: at most this many solver steps (<= `max_steps`, traced: no
        recompilation). `jac_key`: also return `stats["jac_penalty"]`, the Hutchinson
        estimate of ||J_f(z*)||_F^2 / d with `jac_probes` probes, at `z*` held constant (as
        in Bai et al.'s code: the penalty reaches the parameters through f only)."""
        x = self.embed(ids)
        mask = VariationalDropout(self.dropout).mask(
            (2, self.dim), key=key, inference=inference, dtype=x.dtype
        )
        z, sol = self.deq(
            (x, mask), jnp.zeros_like(x), return_solution=True, step_budget=step_budget
        )
        stats = {
            "nfe": sol.nfe,
            "residual": sol.residual,
            "solver_steps": sol.num_steps,
        }
        if jac_key is not None:
            z_star = jax.lax.stop_gradient(z)
            stats["jac_penalty"] = rdeq.jacobian_penalty(
                self.deq.layer, z_star, (x, mask), key=jac_key, num_probes=jac_probes
            )
        return self.head(z), stats


class ExplicitTransformerLM(_LM):
    """The explicit baseline: `num_layers` distinct post-LN transformer blocks, same parts."""

    layers: tuple[EquilibriumTransformerLayer, ...]

    def __init__(self, config: Config, *, key: PRNGKeyArray):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = _embed(config, k1)
        self.layers = tuple(_layer(config, k) for k in jax.random.split(k2, config.num_layers))
        self.head = _head(config, k3)
        self.dropout = config.dropout
        self.dim = config.dim

    def __call__(
        self, ids: Ids, *, key: Key | None = None, inference: bool = False, **solver_options: Any
    ) -> Output:
        """As `DEQTransformerLM`; the solver's options (`step_budget`, `jac_key`) are
        refused: there is no fixed point."""
        if any(v is not None for k, v in solver_options.items() if k != "jac_probes"):
            raise ValueError(
                "the explicit model has no fixed-point solve: `step_budget` (an NFE sweep) "
                "and `jac_key` (--jac_reg) need --model=deq"
            )
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
    step_budget: Int[Array, ""] | None = None,
    jac_reg: float = 0.0,
    jac_reg_probes: int = 1,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Mean next-token cross-entropy (nats) over the weighted targets, and batch statistics.

    Returns `(loss, stats)` with stats `nll_sum`, `num_tokens` (to pool several batches
    exactly) and the solver statistics averaged over the batch's sequences.

    `step_budget` caps the solver's steps (see `DEQTransformerLM`). With `jac_reg > 0` (needs
    `key`) the loss adds `jac_reg * stats["jac_penalty"]`, the batch mean of the Jacobian
    penalty at each sequence's `z*`; sequence `i` draws its probes from
    `split(fold_in(key, 1), batch)[i]`, and the dropout keys are those of `jac_reg = 0`.
    With `jac_reg = 0` no penalty is computed: the program is the one without it.
    """
    batch = inputs.shape[0]
    keys = None if key is None else jax.random.split(key, batch)
    jac_keys = None
    if jac_reg > 0:
        if key is None:
            raise ValueError("`jac_reg > 0` needs a `key` to draw the Jacobian probes from")
        jac_keys = jax.random.split(jax.random.fold_in(key, 1), batch)

    def _one(ids, k, jk):
        return model(
            ids,
            key=k,
            inference=inference,
            step_budget=step_budget,
            jac_key=jk,
            jac_probes=jac_reg_probes,
        )

    logits, stats = jax.vmap(_one)(inputs, keys, jac_keys)
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
    if weights is None:
        weights = jnp.ones(nll.shape, nll.dtype)
    nll_sum = jnp.sum(nll * weights)
    num_tokens = jnp.sum(weights)
    loss = nll_sum / num_tokens
    stats = {name: jnp.mean(value.astype(jnp.float32)) for name, value in stats.items()}
    if jac_reg > 0:
        loss = loss + jac_reg * stats["jac_penalty"]
    return loss, {"nll_sum": nll_sum, "num_tokens": num_tokens, **stats}
