"""The optimiser both experiments use, and the state a train step updates.

AdamW (weight decay on matrices only, as nanoGPT), optional global-norm clipping, and one
of three learning-rate schedules named by `config.schedule`:

* `"cosine"`: linear warm-up over `warmup_steps`, cosine decay to 0 at `train_steps`;
* `"constant"`: `lr` throughout;
* `"plateau"`: `lr` halved (`plateau_factor`) when the training loss, averaged over
  `plateau_window` steps, has not improved for `plateau_patience` windows (the paper's
  CIFAR schedule), never below `min_lr`. It reads each step's loss, so train steps call
  `optimizer.update(grads, opt_state, params, value=loss)` whatever the schedule.

```python
optimizer, lr_at = make_optimizer(config)
state = TrainState.create(model, optimizer)
print(f"{count_params(state.model):,} parameters, lr {lr_at(state.opt_state, 0)}")
```
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PyTree
from optax.contrib import reduce_on_plateau
from optax.contrib._reduce_on_plateau import ReduceLROnPlateauState


class TrainState(eqx.Module):
    """What a train step updates and a checkpoint holds.

    `model`, its `opt_state` (initialised on the model's floating-point arrays), `step`
    (updates applied so far: an array, so it changes without recompiling and is replaced
    together with the model) and `model_state` (BatchNorm statistics, else `None`).
    """

    model: PyTree
    opt_state: PyTree
    step: Int[Array, ""]
    model_state: eqx.nn.State | None = None

    @classmethod
    def create(cls, model, optimizer, model_state=None) -> TrainState:
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return cls(model, opt_state, jnp.asarray(0, jnp.int32), model_state)


def warmup_cosine(lr: float, *, warmup_steps: int, train_steps: int) -> optax.Schedule:
    """0 -> `lr` linearly over `warmup_steps`, then cosine decay to 0 at `train_steps`."""
    if warmup_steps >= train_steps:
        return optax.linear_schedule(0.0, lr, train_steps)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, train_steps)


def _matrices(params: PyTree) -> PyTree:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    config: Any,
) -> tuple[optax.GradientTransformationExtraArgs, Callable[[PyTree, int], Array]]:
    """`(optimizer, lr_at)`: the optimiser of `config` (fields `lr`, `weight_decay`,
    `grad_clip`, `schedule`, `warmup_steps`, `train_steps`, and for `"plateau"` the
    `plateau_*` and `min_lr` fields) and `lr_at(opt_state, step)`, the learning rate of
    that step (for logging)."""
    if config.schedule == "cosine":
        schedule = warmup_cosine(
            config.lr, warmup_steps=config.warmup_steps, train_steps=config.train_steps
        )
        lr_at = lambda opt_state, step: schedule(step)
    else:
        schedule = config.lr
        lr_at = lambda opt_state, step: jnp.asarray(config.lr)
    chain = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    chain.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=_matrices))
    if config.schedule == "plateau":
        chain.append(
            reduce_on_plateau(
                factor=config.plateau_factor,
                patience=config.plateau_patience,
                accumulation_size=config.plateau_window,
                min_scale=config.min_lr / config.lr,
            )
        )
        lr_at = lambda opt_state, step: config.lr * plateau_scale(opt_state)
    return optax.chain(*chain), lr_at


def plateau_scale(opt_state: PyTree) -> Array:
    """The reduce-on-plateau learning-rate multiplier held in `opt_state`."""
    is_plateau = lambda s: isinstance(s, ReduceLROnPlateauState)
    (found,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_plateau) if is_plateau(s)]
    return jnp.asarray(found.scale)


def count_params(model: PyTree) -> int:
    """Number of scalars in the floating-point arrays of `model` (its parameters); also for
    an abstract model (`eqx.filter_eval_shape`), whose leaves are `jax.ShapeDtypeStruct`s."""

    def is_param(x) -> bool:
        if isinstance(x, jax.ShapeDtypeStruct):
            return jnp.issubdtype(x.dtype, jnp.inexact)
        return eqx.is_inexact_array(x)

    return sum(math.prod(x.shape) for x in jax.tree.leaves(model) if is_param(x))
