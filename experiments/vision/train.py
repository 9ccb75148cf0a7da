"""Train a RevDEQ (or baseline) image classifier on CIFAR-10.

    python -m experiments.vision.train --config=small                  # 2-core CPU, minutes
    python -m experiments.vision.train --config=paper-170k --data-dir=/data/cifar10
    python -m experiments.vision.train --config=small --workdir=runs/vision/small --resume
    python -m experiments.vision.train --config=tiny --train-steps=20  # seconds
    python -m experiments.vision.train --config=small --help           # every knob
    python -m experiments.vision.train --config=paper-10m --sharding=fsdp   # FSDP on many devices
    python -m experiments.vision.train --config=paper-10m --distributed     # on every host

Data parallel over all visible devices (`batch_size` is the global batch); `--distributed`
(optionally `--coordinator_address`, `--num_processes`, `--process_id`) first calls
`jax.distributed.initialize()` for a multi-host run.

Reads top to bottom: config, data, model, optimiser, the jitted train step, evaluation, loop.
Writes `<workdir>/metrics.jsonl`, `latest.eqx`/`best.eqx` and `curves.png`.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from optax.contrib import reduce_on_plateau
from optax.contrib._reduce_on_plateau import ReduceLROnPlateauState

from experiments.common.config import config_to_dict, parse_config
from experiments.common.loop import LoopSpec, train_loop, TrainState
from experiments.common.optim import adamw_cosine, count_params, warmup_cosine
from experiments.common.plotting import plot_metrics
from experiments.common.sharding import DataParallel, initialize_distributed, ShardingError

from . import data as vdata
from .configs import Config, CONFIGS
from .models import build_model


DEFAULT_CONFIG = "small"


# ----------------------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------------------


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def total_steps(config: Config, num_train: int) -> int:
    """Optimiser steps of the run: `train_steps`, else `epochs` full passes."""
    if config.train_steps > 0:
        return config.train_steps
    return max(1, int(np.ceil(config.epochs * (num_train // config.batch_size))))


def make_optimizer(
    config: Config, steps: int
) -> tuple[optax.GradientTransformationExtraArgs, Callable[[Any, Any], Any]]:
    """`(optimizer, lr_fn)`. The optimizer's `update` takes `value=` (this step's training loss,
    used by the plateau schedule; ignored otherwise); `lr_fn(opt_state, step)` is the learning
    rate of that step (for logging)."""
    clip = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    if config.schedule == "cosine":
        warmup = min(config.warmup_steps, steps)
        opt = adamw_cosine(
            config.lr,
            warmup_steps=warmup,
            total_steps=steps,
            weight_decay=config.weight_decay,
            clip_norm=config.grad_clip if config.grad_clip > 0 else None,
        )
        schedule = warmup_cosine(config.lr, warmup_steps=warmup, total_steps=steps)
        return optax.with_extra_args_support(opt), lambda opt_state, step: schedule(step)
    adamw = optax.adamw(config.lr, weight_decay=config.weight_decay, mask=_matrices)
    if config.schedule == "constant":
        opt = optax.with_extra_args_support(optax.chain(*clip, adamw))
        return opt, lambda opt_state, step: jnp.asarray(config.lr)
    if config.schedule == "plateau":
        # Paper (appendix B.2): halve the lr when the training loss, averaged over windows of
        # 200 steps, has not improved for 10 windows. The plateau state (its `scale`) lives in
        # the optimiser state and is fed each step's training loss through `update(value=)`.
        plateau = reduce_on_plateau(
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            accumulation_size=config.plateau_window,
            min_scale=config.min_lr / config.lr,
        )
        opt = optax.chain(*clip, adamw, plateau)
        return opt, lambda opt_state, step: config.lr * plateau_scale(opt_state)
    raise ValueError(f"unknown `schedule`={config.schedule!r}; choose plateau, cosine, constant.")


def plateau_scale(opt_state) -> jax.Array:
    """The reduce-on-plateau learning-rate multiplier held in `opt_state`."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ReduceLROnPlateauState))
        if isinstance(s, ReduceLROnPlateauState)
    ]
    if len(found) != 1:
        raise ValueError("no reduce-on-plateau state in this optimiser state")
    return jnp.asarray(found[0].scale)


# ----------------------------------------------------------------------------------------
# Train step and evaluation
# ----------------------------------------------------------------------------------------


def _forward(model, model_state, x, key=None):
    """Batch forward pass: vmap over images with the BatchNorm axis name "batch"."""
    del key
    return jax.vmap(
        lambda xi, st: model(xi, st),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None, 0),
    )(x, model_state)


def make_train_step(
    config: Config, optimizer: optax.GradientTransformationExtraArgs, lr_fn
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The whole training step (augment, forward, backward, optimiser) in one `filter_jit`."""

    @eqx.filter_jit
    def train_step(state: TrainState, batch: dict, key: jax.Array):
        images, labels = batch["image"], batch["label"]
        if config.augment:
            images = vdata.augment(key, images)
        x = vdata.normalise(images)

        def loss_fn(model, model_state):
            logits, model_state, stats = _forward(model, model_state, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (model_state, logits, stats)

        (loss, (model_state, logits, stats)), grads = eqx.filter_value_and_grad(
            loss_fn, has_aux=True
        )(state.model, state.model_state)
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, value=loss)
        model = eqx.apply_updates(state.model, updates)
        metrics = {
            "loss": loss,
            "acc": jnp.mean(jnp.argmax(logits, -1) == labels),
            "lr": lr_fn(state.opt_state, state.step),
            "grad_norm": optax.tree.norm(grads),
        }
        metrics.update({k: jnp.mean(v.astype(jnp.float32)) for k, v in stats.items()})
        new_state = TrainState(
            model=model,
            opt_state=opt_state,
            step=state.step + 1,
            model_state=model_state,
        )
        return new_state, metrics

    return train_step


@eqx.filter_jit
def eval_step(model, model_state, images, labels, valid):
    """Sums over the first `valid` rows: loss, correct predictions, NFE (inference mode)."""
    logits, _, stats = _forward(model, model_state, vdata.normalise(images))
    mask = jnp.arange(labels.shape[0]) < valid
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    out = {
        "loss": jnp.sum(jnp.where(mask, losses, 0.0)),
        "correct": jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == labels, False)),
    }
    out.update({k: jnp.sum(jnp.where(mask, v.astype(jnp.float32), 0.0)) for k, v in stats.items()})
    return out


def evaluate_model(model, model_state, images, labels, batch_size: int) -> dict[str, float]:
    """Test-set loss, accuracy and mean solver statistics, with BatchNorm in inference mode."""
    model = eqx.nn.inference_mode(model)
    totals: dict[str, float] = {}
    for x, y, valid in vdata.eval_batches(images, labels, batch_size):
        out = eval_step(model, model_state, jnp.asarray(x), jnp.asarray(y), valid)
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = len(images)
    result = {"loss": totals.pop("loss") / n, "acc": totals.pop("correct") / n}
    result.update({k: v / n for k, v in totals.items()})
    return result


# ----------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------


def load_data(config: Config) -> vdata.CIFAR10:
    dataset = vdata.load_cifar10(config.data_dir or None, download=config.download)
    return dataset.take(config.train_size or None, config.test_size or None)


def init_state(config: Config, steps: int, key: jax.Array):
    """`(state, optimizer, lr_fn)` at step 0."""
    model, model_state = build_model(config, key)
    optimizer, lr_fn = make_optimizer(config, steps)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    state = TrainState(
        model=model,
        opt_state=opt_state,
        step=jnp.asarray(0, jnp.int32),
        model_state=model_state,
    )
    return state, optimizer, lr_fn


def default_workdir(name: str) -> pathlib.Path:
    return pathlib.Path("runs") / "vision" / name


def train_and_evaluate(
    config: Config,
    workdir: str | pathlib.Path,
    *,
    name: str = "custom",
    dataset: vdata.CIFAR10 | None = None,
) -> TrainState:
    """Train `config` in `workdir` (resuming if `config.resume`), evaluating on the test split;
    returns the final state."""
    workdir = pathlib.Path(workdir)
    # Devices first: an indivisible batch size fails here, before any data is loaded.
    parallel = DataParallel(config.batch_size, config.sharding)
    print(parallel.describe(), flush=True)
    dataset = load_data(config) if dataset is None else dataset
    steps = total_steps(config, len(dataset.x_train))
    state, optimizer, lr_fn = init_state(config, steps, jr.key(config.seed))
    n_params = count_params(state.model)
    print(
        f"vision: {name} ({config.model}, solver={config.solver}, adjoint={config.adjoint}) "
        f"{n_params:,} parameters; data {dataset.source}: {len(dataset.x_train)} train / "
        f"{len(dataset.x_test)} test images; {steps} steps of {config.batch_size} images",
        flush=True,
    )
    batches = vdata.Batches(dataset.x_train, dataset.y_train, config.batch_size, config.seed)
    # Data parallel (or FSDP) over all devices; a no-op on one device.
    state = parallel.place_state(state)

    def get_batch(step: int) -> dict:
        return parallel.place_batch(batches.get(step))

    def evaluate(state: TrainState) -> dict:
        return evaluate_model(
            state.model,
            state.model_state,
            dataset.x_test,
            dataset.y_test,
            config.eval_batch_size,
        )

    header = {
        "experiment": "vision",
        "config_name": name,
        "config": config_to_dict(config),
        "params": n_params,
        "data": dataset.source,
        "parallel": parallel.info(),
    }
    spec = LoopSpec(
        total_steps=steps,
        log_every=config.log_every,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        workdir=workdir,
        seed=config.seed,
    )
    state = train_loop(
        spec=spec,
        state=state,
        train_step=parallel.wrap_step(make_train_step(config, optimizer, lr_fn)),
        get_batch=get_batch,
        evaluate=evaluate,
        header=header,
        resume=config.resume,
        unit_name="images",
        units_per_step=config.batch_size,
        best_key="acc",
        best_mode="max",
    )
    plot_curves(workdir)
    return state


def plot_curves(workdir: pathlib.Path) -> pathlib.Path:
    return plot_metrics(
        workdir,
        workdir / "curves.png",
        panels={
            "loss": [("train", "loss"), ("val", "loss")],
            "accuracy": [("train", "acc"), ("val", "acc")],
            "NFE": [("train", "nfe"), ("val", "nfe")],
            "learning rate": [("train", "lr")],
        },
    )


def config_name(argv: Sequence[str]) -> str:
    for arg in argv:
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return DEFAULT_CONFIG


def main(argv: Sequence[str] | None = None) -> TrainState:
    argv = initialize_distributed(list(sys.argv[1:] if argv is None else argv))
    config, _ = parse_config(CONFIGS, argv, default=DEFAULT_CONFIG)
    name = config_name(argv)
    workdir = config.workdir or default_workdir(name)
    try:
        return train_and_evaluate(config, workdir, name=name)
    except ShardingError as e:  # e.g. a batch size the device count does not divide
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
