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

import dataclasses
import math

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import optax

from experiments.common import config as cfg, run as runs
from experiments.common.checkpoint import load_checkpoint
from experiments.common.optim import count_params, make_optimizer, TrainState
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
        (loss, stats), grads = loss_and_grad(
            state.model, inputs, targets, key=key,
            jac_reg=config.jac_reg, jac_reg_probes=config.jac_reg_probes,
        )  # fmt: skip
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, value=loss)
        model = eqx.apply_updates(state.model, updates)
        del stats["nll_sum"], stats["num_tokens"]
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **stats}
        return TrainState(model, opt_state, state.step + 1), metrics

    return train_step


@eqx.filter_jit
def eval_step(model, inputs, targets, weights, step_budget=None) -> dict:
    return lm_loss(model, inputs, targets, weights, inference=True, step_budget=step_budget)[1]


def evaluate(
    model, tokens: np.ndarray, config: Config, max_tokens: int | None, step_budget=None
) -> dict:
    """Perplexity over contiguous windows covering `tokens` (each token predicted once),
    and the solver statistics averaged over batches. `step_budget` (an int32 scalar array,
    <= the model's `max_steps`) caps the solver's steps without recompiling `eval_step`."""
    sums, batches = {}, 0
    for batch in data.eval_batches(
        tokens, batch_size=config.eval_batch_size, seq_len=config.seq_len, max_tokens=max_tokens
    ):
        for name, value in jax.device_get(eval_step(model, *batch, step_budget)).items():
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
    splits = data.splits_for(config)
    print(f"{parallel.describe()}\ndata: {splits.description}")
    if config.epochs > 0:  # a length in passes over the data (the paper's, Appendix B.1)
        tokens_per_step = config.batch_size * config.seq_len
        steps = math.ceil(config.epochs * len(splits.train) / tokens_per_step)
        config = dataclasses.replace(config, train_steps=steps)
        print(f"{config.epochs:g} epochs of {len(splits.train):,} tokens: {steps:,} steps")
    state = parallel.place_state(init_state(config))
    state, header = run.restore(state) if resume else (state, {})
    best_val, start = header.get("best_val", math.inf), int(state.step)
    header = {"experiment": "wikitext", "name": name, "config": cfg.to_dict(config)}
    run.begin(
        header,
        step=start,
        overwrite=overwrite,
        units_per_step=config.batch_size * config.seq_len,
        unit="tokens",
    )
    print(f"{config.model}: {count_params(state.model):,} parameters; steps {start} -> {config.train_steps}")  # fmt: skip

    train_step, key = parallel.wrap_step(make_train_step(config)), jr.key(config.seed)
    try:
        for step in range(start, config.train_steps):
            inputs, targets = data.get_batch(
                splits.train, step, batch_size=config.batch_size, seq_len=config.seq_len,
                seed=config.seed,
            )  # fmt: skip
            batch = parallel.place_batch((inputs, targets))
            state, metrics = train_step(state, batch, jr.fold_in(key, step))
            done, improved = step + 1, False
            log_now, eval_now, save_now = run.due(done, config)
            if log_now:
                metrics = run.fetch(metrics, done)  # a host sync
                run.log(done, "train", show=("loss", "nfe", "tokens_per_s"), **metrics)
            if eval_now:
                val = evaluate(state.model, splits.val, config, config.eval_tokens)
                improved, best_val = val["loss"] < best_val, min(val["loss"], best_val)
                run.log(done, "val", show=("loss", "ppl"), **val)
            if save_now or improved:
                run.save(state, best=improved, best_val=best_val)
    except KeyboardInterrupt:
        run.interrupted(state)  # saves, then stops with one line

    # Report the checkpoint with the best validation loss (else the final one) on val and test.
    model = load_checkpoint(run.best, state)[0].model if run.best.is_file() else state.model
    val = evaluate(model, splits.val, config, config.eval_tokens)
    test = evaluate(model, splits.test, config, config.test_tokens) if final_test else None
    print(f"val ppl {val['ppl']:.2f}" + (f", test ppl {test['ppl']:.2f}" if test else ""))
    results = {
        "config": cfg.to_dict(config),
        "params": count_params(model),
        "val": val,
        "test": test,
    }
    results["unigram_val"] = data.unigram_perplexity(splits.train, splits.val)
    results["unigram_test"] = data.unigram_perplexity(splits.train, splits.test)
    results["data"] = splits.description
    run.finish(
        results,
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
