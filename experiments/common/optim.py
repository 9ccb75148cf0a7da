"""Optimiser recipe shared by the experiments: AdamW, warm-up, cosine decay, clipping.

```python
optimizer = adamw_cosine(
    3e-4, warmup_steps=100, total_steps=5000, weight_decay=0.1, clip_norm=1.0
)
opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
print(f"{count_params(model):,} parameters")
```
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import optax


def warmup_cosine(
    lr: float, *, warmup_steps: int, total_steps: int, final_lr_ratio: float = 0.0
) -> optax.Schedule:
    r"""Learning rate $0 \to$ `lr` linearly over `warmup_steps`, then cosine decay to
    `final_lr_ratio * lr` at `total_steps` (and constant after)."""
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"`warmup_steps` must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"`final_lr_ratio` must be in [0, 1], got {final_lr_ratio}")
    if warmup_steps == total_steps:
        return optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # optax counts the warm-up inside `decay_steps`
        end_value=final_lr_ratio * lr,
    )


def _matrices(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw_cosine(
    lr: float,
    *,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float,
    clip_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    final_lr_ratio: float = 0.0,
    decay_matrices_only: bool = True,
) -> optax.GradientTransformation:
    """AdamW with the `warmup_cosine` schedule and optional global-norm clipping.

    **Arguments:**

    - `lr`: peak learning rate, reached after `warmup_steps`.
    - `warmup_steps`, `total_steps`: schedule length in optimiser steps.
    - `weight_decay`: decoupled weight decay coefficient.
    - `clip_norm`: clip gradients to this global norm first (`None`: no clipping).
    - `b1`, `b2`: Adam moment decay rates.
    - `final_lr_ratio`: learning rate at `total_steps`, as a fraction of `lr` (nanoGPT
        uses 0.1).
    - `decay_matrices_only`: apply weight decay only to arrays with ndim >= 2 (weights
        and embeddings, not biases or norm scales), as nanoGPT does.

    Initialise it on the array part of the model: `optimizer.init(eqx.filter(model,
    eqx.is_inexact_array))`.
    """
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"`clip_norm` must be positive or None, got {clip_norm}")
    schedule = warmup_cosine(
        lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        final_lr_ratio=final_lr_ratio,
    )
    adamw = optax.adamw(
        schedule,
        b1=b1,
        b2=b2,
        weight_decay=weight_decay,
        mask=_matrices if decay_matrices_only else None,
    )
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def count_params(model: Any) -> int:
    """Number of scalars in the floating-point arrays of `model` (its parameters)."""
    return int(optax.tree.size(eqx.filter(model, eqx.is_inexact_array)))
