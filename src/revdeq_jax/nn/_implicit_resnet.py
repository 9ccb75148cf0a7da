"""Image classifiers built from RevDEQ blocks: the multi-scale implicit ResNet and the
single-scale model of the RevDEQ paper (section 4.2, appendix B.2)."""

from collections.abc import Sequence
from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._custom_types import StepBudget
from .._fixed_point import default_adjoint
from .._jacobian_penalty import jacobian_penalty
from .._solver.reversible import Reversible
from ._conv import ConvResidualLayer, default_groups
from ._deq import DEQ


VISION_BETA = 0.8  # the paper's relaxation for the image models (appendix B.2)


Image: TypeAlias = Float[Array, "cin h w"]
Key: TypeAlias = PRNGKeyArray
Output: TypeAlias = tuple[Float[Array, " classes"], eqx.nn.State, dict[str, Array]]
"""`(logits, state, stats)`: what both classifiers return for one image."""


def _solver_adjoint(solver, adjoint):
    solver = Reversible(VISION_BETA) if solver is None else solver
    adjoint = default_adjoint(solver) if adjoint is None else adjoint
    return solver, adjoint


def _solution_stats(sols) -> dict[str, Array]:
    """Per-example solver statistics summed (NFE, steps) or maximised (residual) over blocks."""
    return {
        "nfe": sum(jnp.asarray(s.nfe, jnp.int32) for s in sols),
        "steps": sum(jnp.asarray(s.num_steps, jnp.int32) for s in sols),
        "residual": jnp.max(jnp.stack([jnp.asarray(s.residual, jnp.float32) for s in sols])),
    }


def _block_budget(step_budget: StepBudget | None, block: DEQ) -> StepBudget | None:
    """One budget for blocks of different ceilings: each runs at most
    `min(step_budget, block.max_steps)` steps (an array, so never a trace-time error)."""
    return None if step_budget is None else jnp.minimum(step_budget, block.max_steps)


def _penalty(block: DEQ, z, x, key: PRNGKeyArray, num_probes: int) -> Array:
    """`jacobian_penalty` of `block`'s layer at its fixed point `z` held constant (the
    convention of Bai et al.'s code: the penalty acts on the parameters through $f$)."""
    z = jax.lax.stop_gradient(z)
    return jacobian_penalty(block.layer, z, x, key=key, num_probes=num_probes)


class PreActDownsample(eqx.Module):
    """Pre-activation residual downsampling unit (He et al. 2016, "Identity mappings"):
    `conv3x3(ReLU(BN(conv3x3_s2(ReLU(BN(x)))))) + conv1x1_s2(x)`. Halves height and width.

    Acts on one image; BatchNorm needs an enclosing `jax.vmap(..., axis_name="batch")`.
    """

    norm1: eqx.nn.BatchNorm
    conv1: eqx.nn.Conv2d
    norm2: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    shortcut: eqx.nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        momentum: float = 0.9,
        dtype=None,
        key: PRNGKeyArray,
    ):
        k1, k2, k3 = jr.split(key, 3)

        def norm(channels):
            return eqx.nn.BatchNorm(channels, "batch", momentum=momentum, mode="batch", dtype=dtype)

        def conv(c_in, size, stride, k):
            padding = size // 2
            return eqx.nn.Conv2d(
                c_in, out_channels, size, stride, padding, use_bias=False, dtype=dtype, key=k
            )

        self.norm1 = norm(in_channels)
        self.conv1 = conv(in_channels, 3, 2, k1)
        self.norm2 = norm(out_channels)
        self.conv2 = conv(out_channels, 3, 1, k2)
        self.shortcut = conv(in_channels, 1, 2, k3)

    def __call__(
        self, x: Float[Array, "cin h w"], state: eqx.nn.State
    ) -> tuple[Float[Array, "cout h2 w2"], eqx.nn.State]:
        h, state = self.norm1(x, state)
        h = self.conv1(jax.nn.relu(h))
        h, state = self.norm2(h, state)
        h = self.conv2(jax.nn.relu(h))
        return h + self.shortcut(x), state


class ImplicitResNet(eqx.Module):
    """Multi-scale implicit ResNet (RevDEQ paper, section 4.2, Figure 2, Table 4).

    `encoder (3x3 conv) -> BatchNorm -> ReLU`, then for each scale `i`: a RevDEQ block on
    `ConvResidualLayer(channels[i], width[i])` run for at most `steps[i]` solver steps, whose
    output is added to its input (ResNet style), followed by a `PreActDownsample` to the next
    scale's channels (all but the last scale); then global average pooling and a linear head.

    Table 4 sizes: 170K `channels=(32,32,32,32), width=(1,2,2,1), steps=(1,4,4,1)`;
    5M `(64,128,128,256), (2,4,4,2), (1,4,4,1)`; 10M `(128,256,256,128), (1,3,3,1), (4,4,4,4)`.

    The same architecture with a classic DEQ is `solver=rdeq.Anderson(), adjoint=rdeq.ImplicitAdjoint()`.

    Acts on one image `(in_channels, H, W)` with an `eqx.nn.State` (BatchNorm statistics):
    build with `eqx.nn.make_with_state(ImplicitResNet)(...)`, call under
    `jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))`, and use
    `eqx.nn.inference_mode(model)` for evaluation.
    """  # noqa: E501

    encoder: eqx.nn.Conv2d
    encoder_norm: eqx.nn.BatchNorm
    blocks: tuple[Any, ...]
    downsamples: tuple[PreActDownsample, ...]
    head: eqx.nn.Linear
    deq_residual: bool = eqx.field(static=True)

    def __init__(
        self,
        channels: Sequence[int] = (32, 32, 32, 32),
        width: Sequence[int] = (1, 2, 2, 1),
        steps: Sequence[int] = (1, 4, 4, 1),
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        solver=None,
        adjoint=None,
        tol: float = 1e-3,
        bn_momentum: float = 0.9,
        deq_residual: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `channels`, `width`, `steps`: per-scale channels, width expansion of the equilibrium
          function, and maximum solver steps (equal lengths).
        - `in_channels`, `num_classes`: input channels and number of logits.
        - `solver`, `adjoint`: the fixed-point solver and gradient strategy of every block
          (default `rdeq.ReversibleAdjoint()` and `rdeq.Reversible(beta=0.8)` with the
          exact state, or a floating state under another adjoint).
        - `tol`: relative-residual tolerance of every block.
        - `bn_momentum`: BatchNorm running-statistics momentum (Equinox convention:
          `new = momentum * old + (1 - momentum) * batch`).
        - `deq_residual`: add each block's output to its input.
        - `dtype`: parameter dtype; `key`: PRNG key.
        """
        channels, width, steps = tuple(channels), tuple(width), tuple(steps)
        if not (len(channels) == len(width) == len(steps) >= 1):
            raise ValueError(
                "`channels`, `width` and `steps` must be non-empty and of equal length, got "
                f"{channels}, {width}, {steps}."
            )
        solver, adjoint = _solver_adjoint(solver, adjoint)
        n = len(channels)
        k_enc, k_head, *ks = jr.split(key, 2 + 2 * n)
        self.encoder = eqx.nn.Conv2d(
            in_channels,
            channels[0],
            3,
            padding=1,
            use_bias=False,
            dtype=dtype,
            key=k_enc,
        )
        self.encoder_norm = eqx.nn.BatchNorm(
            channels[0], "batch", momentum=bn_momentum, mode="batch", dtype=dtype
        )
        self.blocks = tuple(
            DEQ(
                ConvResidualLayer(c, w, dtype=dtype, key=k),
                solver=solver,
                adjoint=adjoint,
                max_steps=s,
                tol=tol,
            )
            for c, w, s, k in zip(channels, width, steps, ks[:n])
        )
        self.downsamples = tuple(
            PreActDownsample(c_in, c_out, momentum=bn_momentum, dtype=dtype, key=k)
            for c_in, c_out, k in zip(channels[:-1], channels[1:], ks[n:])
        )
        self.head = eqx.nn.Linear(channels[-1], num_classes, dtype=dtype, key=k_head)
        self.deq_residual = deq_residual

    def __call__(
        self,
        x: Image,
        state: eqx.nn.State,
        *,
        key: Key | None = None,
        step_budget: StepBudget | None = None,
        jac_key: Key | None = None,
        jac_probes: int = 1,
    ) -> Output:
        """Returns `(logits, state, stats)`; `stats` holds this example's solver statistics:
        `nfe` and `steps` summed over the blocks, and the largest final `residual`.

        - `step_budget`: at most this many solver steps in every block, each block's own
          `steps` capping it (an integer scalar array changes without recompiling; see
          [`revdeq_jax.DEQ`][]).
        - `jac_key`: if given, `stats["jac_penalty"]` is the sum over the blocks of
          [`revdeq_jax.jacobian_penalty`][] of each block's layer at its fixed point
          (held constant), with `jac_probes` probes drawn from this key: add
          `jac_reg * stats["jac_penalty"]` to the loss for Jacobian regularisation.
        """
        del key
        h, state = self.encoder_norm(self.encoder(x), state)
        h = jax.nn.relu(h)
        sols, penalties = [], []
        jac_keys = None if jac_key is None else jr.split(jac_key, len(self.blocks))
        for i, block in enumerate(self.blocks):
            z, sol = block(h, return_solution=True, step_budget=_block_budget(step_budget, block))
            sols.append(sol)
            if jac_keys is not None:
                penalties.append(_penalty(block, z, h, jac_keys[i], jac_probes))
            h = h + z if self.deq_residual else z
            if i < len(self.downsamples):
                h, state = self.downsamples[i](h, state)
        logits = self.head(jnp.mean(h, axis=(1, 2)))
        stats = _solution_stats(sols)
        if penalties:
            stats["jac_penalty"] = sum(penalties)
        return logits, state, stats


class SingleScaleDEQ(eqx.Module):
    """Single-scale RevDEQ classifier (RevDEQ paper, appendix B.2; about 160K parameters with
    the defaults): `3x3 conv (with bias) -> GroupNorm` encoder to `channels`, one RevDEQ block on
    `ConvResidualLayer(channels, width)`, average pooling to `pool x pool`, linear head.

    No BatchNorm, so the forward pass is a deterministic function of the parameters. Takes and
    returns an `eqx.nn.State` only to share the calling convention of `ImplicitResNet`
    (`(logits, state, stats) = model(x, state)`); it is passed through unchanged.
    """

    encoder: eqx.nn.Conv2d
    encoder_norm: eqx.nn.GroupNorm
    block: Any
    head: eqx.nn.Linear
    pool: int = eqx.field(static=True)

    def __init__(
        self,
        channels: int = 64,
        width: int = 2,
        steps: int = 4,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        pool: int = 4,
        solver=None,
        adjoint=None,
        tol: float = 1e-3,
        dtype=None,
        key: PRNGKeyArray,
    ):
        solver, adjoint = _solver_adjoint(solver, adjoint)
        k_enc, k_block, k_head = jr.split(key, 3)
        self.encoder = eqx.nn.Conv2d(in_channels, channels, 3, padding=1, dtype=dtype, key=k_enc)
        self.encoder_norm = eqx.nn.GroupNorm(default_groups(channels), channels, dtype=dtype)
        self.block = DEQ(
            ConvResidualLayer(channels, width, dtype=dtype, key=k_block),
            solver=solver,
            adjoint=adjoint,
            max_steps=steps,
            tol=tol,
        )
        self.head = eqx.nn.Linear(channels * pool * pool, num_classes, dtype=dtype, key=k_head)
        self.pool = pool

    def __call__(
        self,
        x: Image,
        state: eqx.nn.State,
        *,
        key: Key | None = None,
        step_budget: StepBudget | None = None,
        jac_key: Key | None = None,
        jac_probes: int = 1,
    ) -> Output:
        """Returns `(logits, state, stats)`; `step_budget`, `jac_key` and `jac_probes` as
        for [`revdeq_jax.nn.ImplicitResNet`][]."""
        del key
        h = self.encoder_norm(self.encoder(x))
        z, sol = self.block(
            h, return_solution=True, step_budget=_block_budget(step_budget, self.block)
        )
        c, hh, ww = z.shape
        if hh % self.pool or ww % self.pool:
            raise ValueError(f"image size {hh}x{ww} is not divisible by `pool`={self.pool}.")
        pooled = z.reshape(c, self.pool, hh // self.pool, self.pool, ww // self.pool).mean((2, 4))
        logits = self.head(pooled.reshape(-1))
        stats = _solution_stats([sol])
        if jac_key is not None:
            stats["jac_penalty"] = _penalty(self.block, z, h, jac_key, jac_probes)
        return logits, state, stats
