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

import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from experiments.common import config as cfg, run as runs
from experiments.common.checkpoint import load_checkpoint
from experiments.common.optim import count_params, make_optimizer, TrainState
from experiments.common.plotting import plot_metrics
from experiments.common.sharding import DataParallel

from . import data as vdata
from .configs import Config, CONFIGS
from .models import build_model


def init_state(config: Config) -> TrainState:
    model, bn_state = build_model(config, jr.key(config.seed))
    return TrainState.create(model, make_optimizer(config)[0], bn_state)


def _forward(model, bn_state, images):
    """Batch forward pass: vmap over images, BatchNorm statistics over the axis "batch"."""
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None, 0))(
        images, bn_state
    )


def make_train_step(config: Config):
    optimizer, lr_at = make_optimizer(config)

    def loss_fn(model, bn_state, images, labels):
        logits, bn_state, stats = _forward(model, bn_state, vdata.normalise(images))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (bn_state, jnp.mean(jnp.argmax(logits, -1) == labels), stats)

    @eqx.filter_jit
    def train_step(state: TrainState, batch, key):
        images = vdata.augment(key, batch["image"]) if config.augment else batch["image"]
        loss_and_grad = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, (bn_state, acc, stats)), grads = loss_and_grad(
            state.model, state.model_state, images, batch["label"]
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
def eval_step(model, bn_state, images, labels, valid):
    """Sums over the first `valid` rows: loss, correct predictions, solver statistics."""
    logits, _, stats = _forward(model, bn_state, vdata.normalise(images))
    mask = jnp.arange(labels.shape[0]) < valid
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums = {"loss": losses, "acc": jnp.argmax(logits, -1) == labels, **stats}
    return {
        name: jnp.sum(jnp.where(mask, value, 0).astype(jnp.float32)) for name, value in sums.items()
    }


def evaluate(model, bn_state, images, labels, batch_size: int) -> dict[str, float]:
    """Mean loss, accuracy and solver statistics, BatchNorm in inference mode."""
    model, sums = eqx.nn.inference_mode(model), {}
    for x, y, valid in vdata.eval_batches(images, labels, batch_size):
        for name, value in eval_step(model, bn_state, x, y, valid).items():
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
    state, best_acc = parallel.place_state(init_state(config)), -1.0
    if resume and (restored := run.restore(state)):
        state, header = restored
        best_acc = header.get("best_acc", -1.0)
    start = int(state.step)
    run.begin(
        {"experiment": "cifar", "name": name, "config": cfg.to_dict(config)},
        step=start,
        overwrite=overwrite,
    )
    print(
        f"{config.model} ({config.solver}, {config.adjoint}): {count_params(state.model):,} "
        f"parameters; {len(batches.images)} train / {n_val} val / {len(dataset.x_test)} test "
        f"images; steps {start} -> {config.train_steps} of {config.batch_size}; {run.dir}"
    )

    train_step, key = parallel.wrap_step(make_train_step(config)), jr.key(config.seed)
    clock = None  # (time, step) of the last host sync; the first window (compilation) is untimed
    try:
        for step in range(start, config.train_steps):
            batch = parallel.place_batch(batches.get(step))
            state, metrics = train_step(state, batch, jr.fold_in(key, step))
            done, last = step + 1, step + 1 == config.train_steps
            log_now = done % config.log_every == 0 or last
            eval_now = done % config.eval_every == 0 or last
            improved = False

            if log_now:
                metrics = {name: float(value) for name, value in metrics.items()}  # a host sync
                if clock is not None:
                    metrics["ms_per_step"] = (
                        1e3 * (time.perf_counter() - clock[0]) / (done - clock[1])
                    )
                    metrics["images_per_s"] = 1e3 * config.batch_size / metrics["ms_per_step"]
                speed = f" | {metrics['images_per_s']:.0f} images/s" if clock else ""
                print(f"step {done} | loss {metrics['loss']:.4f} | acc {metrics['acc']:.3f}{speed}")
                run.log(done, "train", **metrics)
            if eval_now:
                val = evaluate(state.model, state.model_state, x_val, y_val, config.eval_batch_size)
                improved, best_acc = val["acc"] > best_acc, max(val["acc"], best_acc)
                print(f"val step {done} | loss {val['loss']:.4f} | acc {val['acc']:.3f}")
                run.log(done, "val", **val)
            if done % config.checkpoint_every == 0 or last or improved:
                run.save(state, best=improved, best_acc=best_acc)
            if log_now or eval_now:
                clock = (time.perf_counter(), done)
    except KeyboardInterrupt:
        path = run.save(state, best_acc=best_acc)
        raise KeyboardInterrupt(f"saved step {int(state.step)} to {path}; continue with --resume")

    # Report the checkpoint with the best validation accuracy on the test split.
    best = load_checkpoint(run.best, state)[0] if run.best.is_file() else state
    results = {
        "config": cfg.to_dict(config),
        "checkpoint": "best" if run.best.is_file() else "final",
        "step": int(best.step),
        "params": count_params(best.model),
        "val": evaluate(best.model, best.model_state, x_val, y_val, config.eval_batch_size),
        "test": evaluate(
            best.model, best.model_state, dataset.x_test, dataset.y_test, config.eval_batch_size
        ),
        "data": dataset.source,
        "parallel": parallel.info(),
    }
    (run.dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['checkpoint']} checkpoint: test acc {results['test']['acc']:.3f}")
    plot_metrics(
        run.dir,
        run.dir / "curves.png",
        panels={
            "loss": [("train", "loss"), ("val", "loss")],
            "accuracy": [("train", "acc"), ("val", "acc")],
            "NFE": [("train", "nfe"), ("val", "nfe")],
            "learning rate": [("train", "lr")],
        },
    )
    return results


def main(argv: list[str] | None = None):
    return runs.main(
        train, CONFIGS, argv, default="small", experiment="cifar", errors=(vdata.CIFAR10DataError,)
    )


if __name__ == "__main__":
    main()
