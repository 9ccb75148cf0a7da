"""Train a RevDEQ transformer language model on WikiText.

    # seconds: smoke run on the offline WikiText-2 files (train on wiki.valid, test on wiki.test)
    python -m experiments.language.train --config=tiny --data-dir=../shared/data/wikitext-2-raw --workdir=runs/lm-tiny
    # ~10 minutes on a 2-core CPU
    python -m experiments.language.train --config=small --data-dir=../shared/data/wikitext-2-raw --workdir=runs/lm-small
    python -m experiments.language.train --workdir=runs/lm-small --resume        # continue, with its config.json
    python -m experiments.language.train --config=small --workdir=runs/lm-small --overwrite   # start over
    # the paper's 94M model on WikiText-103 (HF hub download, or --data-dir with wiki.*.raw)
    python -m experiments.language.train --config=paper --workdir=runs/lm-paper
    # baselines: DEQ with implicit gradients, explicit transformer
    python -m experiments.language.train --config=small --solver=anderson --adjoint=implicit --max_steps=15 ...
    python -m experiments.language.train --config=small --model=explicit --num_layers=4 ...
    # several devices: data parallel over all of them; FSDP on request; several hosts
    python -m experiments.language.train --config=paper --sharding=fsdp --distributed ...

Every field of `configs.Config` can be overridden with `--key=value` (`--help` lists them);
`--workdir` (default `runs/wikitext-<config>`) is one run: `config.json`, `metrics.jsonl`,
`latest.eqx`/`best.eqx`, then `results.json` and `curves.png`. Step `s` uses batch
`get_batch(s)` and key `fold_in(key(seed), s)`, so a resumed run is the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import optax

from experiments.common import config as cfg, run as runs
from experiments.common.checkpoint import load_checkpoint
from experiments.common.optim import count_params, make_optimizer, TrainState
from experiments.common.plotting import plot_metrics
from experiments.common.sharding import DataParallel

from . import data
from .configs import Config, CONFIGS
from .model import lm_loss, make_model


def init_state(config: Config) -> TrainState:
    model_key, _ = jr.split(jr.key(config.seed))  # the step keys fold_in(key(seed), s) differ
    return TrainState.create(make_model(config, key=model_key), make_optimizer(config)[0])


def make_train_step(config: Config):
    optimizer, _ = make_optimizer(config)

    @eqx.filter_jit
    def train_step(state: TrainState, batch, key):
        inputs, targets = batch
        loss_and_grad = eqx.filter_value_and_grad(lm_loss, has_aux=True)
        (loss, stats), grads = loss_and_grad(state.model, inputs, targets, key=key)
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, value=loss)
        model = eqx.apply_updates(state.model, updates)
        del stats["nll_sum"], stats["num_tokens"]
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **stats}
        return TrainState(model, opt_state, state.step + 1), metrics

    return train_step


@eqx.filter_jit
def eval_step(model, inputs, targets, weights) -> dict:
    return lm_loss(model, inputs, targets, weights, inference=True)[1]


def evaluate(model, tokens: np.ndarray, config: Config, max_tokens: int | None) -> dict:
    """Perplexity over contiguous windows covering `tokens` (each token predicted once),
    and the solver statistics averaged over batches."""
    sums, batches = {}, 0
    for batch in data.eval_batches(
        tokens, batch_size=config.eval_batch_size, seq_len=config.seq_len, max_tokens=max_tokens
    ):
        for name, value in jax.device_get(eval_step(model, *batch)).items():
            sums[name] = sums.get(name, 0.0) + float(value)
        batches += 1
    loss, count = sums.pop("nll_sum") / sums["num_tokens"], sums.pop("num_tokens")
    return {"loss": loss, "ppl": math.exp(loss), "tokens": int(count)} | {
        name: total / batches for name, total in sums.items()
    }


def train(
    config: Config, workdir, *, name="custom", resume=False, overwrite=False, final_test=True
):
    run = runs.Run(workdir)
    run.check(resume=resume, overwrite=overwrite)
    parallel = DataParallel(config.batch_size, config.sharding)  # before data: fails fast
    splits = data.load_splits(
        data_dir=config.data_dir, hub_config=config.hub_config, splits=config.splits,
        holdout_fraction=config.holdout_fraction, tokenizer_dir=config.tokenizer_dir,
        cache_dir=config.cache_dir,
    )  # fmt: skip
    print(f"{parallel.describe()}\ndata: {splits.description}")
    state, best_val = parallel.place_state(init_state(config)), math.inf
    if resume and (restored := run.restore(state)):
        state, header = restored
        best_val = header.get("best_val", math.inf)
    start, tokens_per_step = int(state.step), config.batch_size * config.seq_len
    run.begin(
        {"experiment": "wikitext", "name": name, "config": cfg.to_dict(config)},
        step=start,
        overwrite=overwrite,
    )
    print(
        f"{config.model}: {count_params(state.model):,} parameters, {tokens_per_step:,} tokens "
        f"per step; steps {start} -> {config.train_steps}; {run.dir}"
    )

    train_step, key = parallel.wrap_step(make_train_step(config)), jr.key(config.seed)
    clock = None  # (time, step) of the last host sync; the first window (compilation) is untimed
    try:
        for step in range(start, config.train_steps):
            inputs, targets = data.get_batch(
                splits.train, step, batch_size=config.batch_size, seq_len=config.seq_len,
                seed=config.seed,
            )  # fmt: skip
            batch = parallel.place_batch((inputs, targets))
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
                    metrics["tokens_per_s"] = 1e3 * tokens_per_step / metrics["ms_per_step"]
                speed = f" | {metrics['ms_per_step']:.0f} ms/step" if clock else ""
                print(f"step {done} | loss {metrics['loss']:.4f} | nfe {metrics['nfe']:.1f}{speed}")
                run.log(done, "train", **metrics)
            if eval_now:
                val = evaluate(state.model, splits.val, config, config.eval_tokens)
                improved, best_val = val["loss"] < best_val, min(val["loss"], best_val)
                print(f"val step {done} | loss {val['loss']:.4f} | ppl {val['ppl']:.2f}")
                run.log(done, "val", **val)
            if done % config.checkpoint_every == 0 or last or improved:
                run.save(state, best=improved, best_val=best_val)
            if log_now or eval_now:
                clock = (time.perf_counter(), done)
    except KeyboardInterrupt:
        path = run.save(state, best_val=best_val)
        raise KeyboardInterrupt(f"saved step {int(state.step)} to {path}; continue with --resume")

    # Report the checkpoint with the best validation loss (else the final one) on val and test.
    best = run.best if run.best.is_file() else None
    model = load_checkpoint(best, state)[0].model if best else state.model
    results = {
        "config": cfg.to_dict(config),
        "checkpoint": "best" if best else "final",
        "params": count_params(model),
        "val": evaluate(model, splits.val, config, config.eval_tokens),
        "test": evaluate(model, splits.test, config, config.test_tokens) if final_test else None,
        "unigram_val": data.unigram_perplexity(splits.train, splits.val),
        "unigram_test": data.unigram_perplexity(splits.train, splits.test),
        "data": splits.description,
        "parallel": parallel.info(),
    }
    (run.dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    test = f", test ppl {results['test']['ppl']:.2f}" if final_test else ""
    print(f"{results['checkpoint']} checkpoint: val ppl {results['val']['ppl']:.2f}{test}")
    plot_metrics(
        run.dir,
        run.dir / "curves.png",
        panels={
            "loss": [("train", "loss"), ("val", "loss")],
            "val perplexity": [("val", "ppl")],
            "NFE": [("train", "nfe"), ("val", "nfe")],
            "relative residual": [("train", "residual"), ("val", "residual")],
        },
    )
    return results


def main(argv: list[str] | None = None):
    return runs.main(
        train, CONFIGS, argv, default="small", experiment="wikitext", errors=(data.DataError,)
    )


if __name__ == "__main__":
    main()
