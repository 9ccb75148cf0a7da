"""Train a RevDEQ (or baseline) image classifier on CIFAR-10.

    python -m experiments.vision.train --config=small                  # 2-core CPU, minutes
    python -m experiments.vision.train --config=tiny --train_steps=20  # seconds
    python -m experiments.vision.train --config=paper-170k --data-dir=/data/cifar10
    python -m experiments.vision.train --workdir=runs/cifar-small --resume   # continue, with its config.json
    python -m experiments.vision.train --config=small --overwrite      # start runs/cifar-small over
    python -m experiments.vision.train --config=small --help           # every knob
    python -m experiments.vision.train --config=paper-10m --sharding=fsdp --distributed   # many devices/hosts

The last `holdout_fraction` of the training images is held out: validation runs on it and
picks `best.eqx`; the test split is only used to report the best checkpoint at the end.
`--workdir` (default `runs/cifar-<config>`) is one run: `config.json`, `metrics.jsonl`,
`latest.eqx`/`best.eqx`, then `results.json` and `curves.png`. Step `s` uses batch
`batches.get(s)` and key `fold_in(key(seed), s)`, so a resumed run is the uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from experiments.common import config as cfg, run as runs
from experiments.common.checkpoint import load_checkpoint
from experiments.common.optim import count_params, make_optimizer, TrainState
from experiments.common.sharding import DataParallel

from . import data as vdata
from .configs import Config, CONFIGS
from .models import build_model


def init_state(config: Config) -> TrainState:
    model, bn_state = build_model(config, jr.key(config.seed))
    return TrainState.create(model, make_optimizer(config)[0], bn_state)


def _forward(model, bn_state, images, *, step_budget=None, jac_keys=None, jac_probes=1):
    """Batch forward pass: vmap over images, BatchNorm statistics over the axis "batch".

    Only DEQ models take `step_budget` (a traced cap on every block's solver steps) and
    `jac_keys` (one key per image: the stats then carry each image's `jac_penalty`)."""
    kwargs = {}
    if step_budget is not None:
        kwargs["step_budget"] = step_budget
    if jac_keys is not None:
        kwargs["jac_probes"] = jac_probes

    def _one(image, state, jac_key):
        extra = kwargs if jac_key is None else kwargs | {"jac_key": jac_key}
        return model(image, state, **extra)

    return jax.vmap(_one, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None, 0))(
        images, bn_state, jac_keys
    )


def make_train_step(config: Config):
    optimizer, lr_at = make_optimizer(config)

    def loss_fn(model, bn_state, images, labels, jac_keys):
        """Cross-entropy, plus `jac_reg` times the batch mean of the Jacobian penalty when
        `jac_keys` is given (only for `jac_reg > 0`: otherwise nothing is computed)."""
        logits, bn_state, stats = _forward(
            model, bn_state, vdata.normalise(images),
            jac_keys=jac_keys, jac_probes=config.jac_reg_probes,
        )  # fmt: skip
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        if jac_keys is not None:
            loss = loss + config.jac_reg * jnp.mean(stats["jac_penalty"])
        return loss, (bn_state, jnp.mean(jnp.argmax(logits, -1) == labels), stats)

    @eqx.filter_jit
    def train_step(state: TrainState, batch, key):
        images = vdata.augment(key, batch["image"]) if config.augment else batch["image"]
        # Probe keys for the Jacobian penalty: from `fold_in(key, 1)`, so the augmentation
        # draws the same with and without it.
        n = batch["label"].shape[0]
        jac_keys = jr.split(jr.fold_in(key, 1), n) if config.jac_reg > 0 else None
        loss_and_grad = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, (bn_state, acc, stats)), grads = loss_and_grad(
            state.model, state.model_state, images, batch["label"], jac_keys
        )
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, value=loss)
        model = eqx.apply_updates(state.model, updates)
        metrics = {"loss": loss, "acc": acc, "grad_norm": optax.tree.norm(grads)}
        metrics |= {"lr": lr_at(state.opt_state, state.step)}
        metrics |= {name: jnp.mean(value.astype(jnp.float32)) for name, value in stats.items()}
        return TrainState(model, opt_state, state.step + 1, bn_state), metrics

    return train_step


@eqx.filter_jit
def eval_step(model, bn_state, images, labels, valid, step_budget=None):
    """Sums over the first `valid` rows: loss, correct predictions, solver statistics.
    `step_budget` (an int32 scalar array) caps every DEQ block's solver steps."""
    logits, _, stats = _forward(model, bn_state, vdata.normalise(images), step_budget=step_budget)
    mask = jnp.arange(labels.shape[0]) < valid
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums = {"loss": losses, "acc": jnp.argmax(logits, -1) == labels, **stats}
    return {
        name: jnp.sum(jnp.where(mask, value, 0).astype(jnp.float32)) for name, value in sums.items()
    }


def evaluate(
    model, bn_state, images, labels, batch_size: int, step_budget=None
) -> dict[str, float]:
    """Mean loss, accuracy and solver statistics, BatchNorm in inference mode. `step_budget`:
    see `eval_step` (a new value reuses the compiled step)."""
    model, sums = eqx.nn.inference_mode(model), {}
    for x, y, valid in vdata.eval_batches(images, labels, batch_size):
        for name, value in eval_step(model, bn_state, x, y, valid, step_budget).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    return {name: total / len(images) for name, total in sums.items()}


def train(config: Config, workdir, *, name="custom", resume=False, overwrite=False, dataset=None):
    run = runs.Run(workdir)
    run.check(resume=resume, overwrite=overwrite)
    parallel = DataParallel(config.batch_size, config.sharding)  # before data: fails fast
    if dataset is None:
        dataset = vdata.load_cifar10(config.data_dir, download=config.download)
    dataset = dataset.take(config.train_size or None, config.test_size or None)
    n_val = max(1, round(config.holdout_fraction * len(dataset.x_train)))
    x_val, y_val = dataset.x_train[-n_val:], dataset.y_train[-n_val:]
    if len(dataset.x_train) - n_val < config.batch_size:
        raise cfg.ConfigError(
            f"--batch_size={config.batch_size} exceeds the {len(dataset.x_train) - n_val} "
            "training images; use a smaller batch or more data (--train_size)"
        )
    batches = vdata.Batches(
        dataset.x_train[:-n_val], dataset.y_train[:-n_val], config.batch_size, config.seed
    )
    print(f"{parallel.describe()}\ndata: {dataset.source}")
    state = parallel.place_state(init_state(config))
    state, header = run.restore(state) if resume else (state, {})
    best_acc, start = header.get("best_acc", -1.0), int(state.step)
    header = {"experiment": "cifar", "name": name, "config": cfg.to_dict(config)}
    run.begin(
        header, step=start, overwrite=overwrite, units_per_step=config.batch_size, unit="images"
    )
    print(
        f"{config.model} ({config.solver}, {config.adjoint}): {count_params(state.model):,} "
        f"parameters; {len(batches.images)} train / {n_val} val / {len(dataset.x_test)} test "
        f"images; steps {start} -> {config.train_steps}"
    )

    train_step, key = parallel.wrap_step(make_train_step(config)), jr.key(config.seed)
    try:
        for step in range(start, config.train_steps):
            batch = parallel.place_batch(batches.get(step))
            state, metrics = train_step(state, batch, jr.fold_in(key, step))
            done, improved = step + 1, False
            log_now, eval_now, save_now = run.due(done, config)
            if log_now:
                metrics = run.fetch(metrics, done)  # a host sync
                run.log(done, "train", show=("loss", "acc", "images_per_s"), **metrics)
                if config.schedule == "plateau" and metrics["lr"] <= config.min_lr * (1 + 1e-6):
                    print(
                        f"learning rate down to min_lr={config.min_lr:g}: stopping (paper's rule)"
                    )
                    config = dataclasses.replace(config, train_steps=done)  # the last step
                    log_now, eval_now, save_now = run.due(done, config)
            if eval_now:
                val = evaluate(state.model, state.model_state, x_val, y_val, config.eval_batch_size)
                improved, best_acc = val["acc"] > best_acc, max(val["acc"], best_acc)
                run.log(done, "val", show=("loss", "acc"), **val)
            if save_now or improved:
                run.save(state, best=improved, best_acc=best_acc)
            if done == config.train_steps:  # the stopping rule ended the run early
                break
    except KeyboardInterrupt:
        run.interrupted(state)  # saves, then stops with one line

    # Report the checkpoint with the best validation accuracy on the test split, once.
    best = load_checkpoint(run.best, state)[0] if run.best.is_file() else state
    val = evaluate(best.model, best.model_state, x_val, y_val, config.eval_batch_size)
    test = evaluate(best.model, best.model_state, *dataset.test(), config.eval_batch_size)
    print(
        f"step {int(best.step)} (best val acc): val acc {val['acc']:.3f}, test acc {test['acc']:.3f}"
    )
    results = {
        "config": cfg.to_dict(config),
        "params": count_params(best.model),
        "step": int(best.step),
    }
    run.finish(
        results | {"val": val, "test": test, "data": dataset.source},
        panels={
            "loss": [("train", "loss"), ("val", "loss")],
            "accuracy": [("train", "acc"), ("val", "acc")],
            "NFE": [("train", "nfe"), ("val", "nfe")],
            "learning rate": [("train", "lr")],
        },
    )
    return results | {"val": val, "test": test}


def main(argv: list[str] | None = None):
    return runs.main(
        train, CONFIGS, argv, default="small", experiment="cifar", errors=(vdata.CIFAR10DataError,)
    )


if __name__ == "__main__":
    main()
