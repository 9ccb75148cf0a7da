"""Train a RevDEQ transformer language model on WikiText.

    # seconds: smoke run on the offline WikiText-2 files (train on wiki.valid, test on wiki.test)
    python -m experiments.language.train --config=tiny --data-dir=../shared/data/wikitext-2-raw --workdir=runs/lm-tiny
    # ~10 minutes on a 2-core CPU
    python -m experiments.language.train --config=small --data-dir=../shared/data/wikitext-2-raw --workdir=runs/lm-small
    python -m experiments.language.train --config=small --workdir=runs/lm-small --resume   # continue
    # the paper's 94M model on WikiText-103 (HF hub download, or --data-dir with wiki.*.raw)
    python -m experiments.language.train --config=paper --workdir=runs/lm-paper
    # baselines: DEQ with implicit gradients, explicit transformer
    python -m experiments.language.train --config=small --solver=anderson --adjoint=implicit --max_steps=15 ...
    python -m experiments.language.train --config=small --model=explicit --num_layers=4 ...
    # several devices: data parallel over all of them automatically; FSDP on request
    python -m experiments.language.train --config=paper --sharding=fsdp ...
    # several hosts: run on every host (see "Scaling out" in the top-level README)
    python -m experiments.language.train --config=paper --distributed ...

Every field of `configs.Config` can be overridden with `--key=value` (`--help` lists them).
`--workdir` (default `runs/wikitext-<config>`) receives `config.json`, `metrics.jsonl`,
`latest.eqx` / `best.eqx` checkpoints, `curves.png` and `results.json`.
`--resume` continues from `latest.eqx` with the config stored in the run (new overrides on top).
`--distributed` (optionally with `--coordinator_address`, `--num_processes`, `--process_id`)
calls `jax.distributed.initialize()` first; `batch_size` is always the global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import equinox as eqx
import jax
import numpy as np
import optax

from experiments.common.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    read_header,
)
from experiments.common.config import config_from_dict, config_to_dict, parse_config
from experiments.common.loop import LoopSpec, NonFiniteLossError, train_loop, TrainState
from experiments.common.optim import adamw_cosine, count_params
from experiments.common.plotting import plot_metrics
from experiments.common.sharding import DataParallel, initialize_distributed, ShardingError

from . import data
from .configs import Config, CONFIGS
from .model import lm_loss, make_model


# ---------------------------------------------------------------------------------------------
# Optimiser, state and the one jitted train step


def make_optimizer(config: Config) -> optax.GradientTransformation:
    return adamw_cosine(
        config.lr,
        warmup_steps=config.warmup_steps,
        total_steps=config.total_steps,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
    )


def init_state(config: Config) -> TrainState:
    """Model and optimiser state at step 0. The model key is split off `key(seed)`; the loop's
    per-step keys are `fold_in(key(seed), step)`, a different stream."""
    model_key, _ = jax.random.split(jax.random.key(config.seed))
    return TrainState.create(make_model(config, key=model_key), make_optimizer(config))


def make_train_step(config: Config):
    """`train_step(state, (inputs, targets), key) -> (state, metrics)`: forward, backward (the
    reversible adjoint for RevDEQ) and AdamW update in one `eqx.filter_jit`."""
    optimizer = make_optimizer(config)

    @eqx.filter_jit
    def train_step(state: TrainState, batch, key):
        inputs, targets = batch

        def loss_fn(model):
            return lm_loss(model, inputs, targets, key=key)

        (loss, stats), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(state.model)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        metrics.update({k: v for k, v in stats.items() if k not in ("nll_sum", "num_tokens")})
        return state.apply_gradients(grads, optimizer), metrics

    return train_step


@eqx.filter_jit
def eval_step(model, inputs, targets, weights) -> dict:
    """Summed NLL, token count and mean solver statistics of one evaluation batch."""
    return lm_loss(model, inputs, targets, weights, inference=True)[1]


def make_evaluator(config: Config, tokens: np.ndarray, *, max_tokens: int | None = None):
    """`evaluate(model) -> {"loss", "ppl", "tokens", "nfe", "residual", ...}` over contiguous
    non-overlapping windows of `tokens` (the whole split unless `max_tokens`): each token but
    the first is predicted exactly once, so `ppl = exp(loss)` is the split's perplexity."""

    def evaluate(model) -> dict[str, float]:
        nll, count, solver_stats, batches = 0.0, 0.0, {}, 0
        for inputs, targets, weights in data.eval_batches(
            tokens,
            batch_size=config.eval_batch_size,
            seq_len=config.seq_len,
            max_tokens=max_tokens,
        ):
            stats = jax.device_get(eval_step(model, inputs, targets, weights))
            nll += float(stats.pop("nll_sum"))
            count += float(stats.pop("num_tokens"))
            for name, value in stats.items():
                solver_stats[name] = solver_stats.get(name, 0.0) + float(value)
            batches += 1
        loss = nll / count
        results = {"loss": loss, "ppl": float(np.exp(loss)), "tokens": int(count)}
        results.update({name: total / batches for name, total in solver_stats.items()})
        return results

    return evaluate


# ---------------------------------------------------------------------------------------------
# The run


def train_and_evaluate(
    config: Config,
    workdir: str | pathlib.Path,
    *,
    resume: bool = False,
    final_test: bool = True,
) -> dict:
    """Train `config` in `workdir` (resuming from its `latest.eqx` if `resume`), evaluate the
    best checkpoint (lowest validation loss) on the validation and, if `final_test`, the test
    split; write `results.json` and `curves.png` there and return the results."""
    workdir = pathlib.Path(workdir)
    # Devices first: an indivisible batch size fails here, before any data is loaded.
    parallel = DataParallel(config.batch_size, config.sharding)
    print(parallel.describe())
    splits = data.load_splits(
        data_dir=config.data_dir,
        hub_config=config.hub_config,
        splits=config.splits,
        holdout_fraction=config.holdout_fraction,
        tokenizer_dir=config.tokenizer_dir,
        cache_dir=config.cache_dir,
    )
    unigram = data.unigram_perplexity(splits.train, splits.val)
    print(f"data: {splits.description}")
    print(
        f"tokens: train {len(splits.train):,}  val {len(splits.val):,}  test {len(splits.test):,}; "
        f"unigram val perplexity: {unigram['fitted']:.1f} (fitted on train), "
        f"{unigram['oracle']:.1f} (oracle)"
    )

    state = parallel.place_state(init_state(config))
    tokens_per_step = config.batch_size * config.seq_len
    print(
        f"model: {config.model}, {count_params(state.model):,} parameters; {tokens_per_step:,} tokens/step"
    )

    def get_batch(step: int):
        batch = data.get_batch(
            splits.train,
            step,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            seed=config.seed,
        )
        return parallel.place_batch(batch)

    evaluate_val = make_evaluator(config, splits.val, max_tokens=config.eval_tokens)
    spec = LoopSpec(
        total_steps=config.total_steps,
        log_every=config.log_every,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        workdir=str(workdir),
        seed=config.seed,
    )
    state = train_loop(
        spec=spec,
        state=state,
        train_step=parallel.wrap_step(make_train_step(config)),
        get_batch=get_batch,
        evaluate=lambda s: evaluate_val(s.model),
        header={
            "config": config_to_dict(config),
            "experiment": "language",
            "parallel": parallel.info(),
        },
        resume=resume,
        unit_name="tokens",
        units_per_step=tokens_per_step,
        best_key="loss",
        best_mode="min",
    )

    # Test perplexity of the best checkpoint (lowest validation loss), else the final model.
    best = CheckpointManager(workdir).best_path()
    model, source = state.model, "final"
    if best is not None:
        model, source = load_checkpoint(best, like=state)[0].model, "best"
    t0 = time.perf_counter()
    val = make_evaluator(config, splits.val, max_tokens=config.eval_tokens)(model)
    test = (
        make_evaluator(config, splits.test, max_tokens=config.test_tokens)(model)
        if final_test
        else None
    )
    results = {
        "config": config_to_dict(config),
        "checkpoint": source,
        "params": count_params(state.model),
        "val": val,
        "test": test,
        "unigram_val": data.unigram_perplexity(splits.train, splits.val),
        "unigram_test": data.unigram_perplexity(splits.train, splits.test),
        "data": splits.description,
        "parallel": parallel.info(),
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    shown = test if test is not None else val
    print(
        f"{source} checkpoint: val ppl {val['ppl']:.2f}"
        + (f", test ppl {test['ppl']:.2f}" if test is not None else "")
        + f" (unigram val: fitted {results['unigram_val']['fitted']:.1f}, "
        f"oracle {results['unigram_val']['oracle']:.1f}; unigram test: fitted "
        f"{results['unigram_test']['fitted']:.1f}, oracle {results['unigram_test']['oracle']:.1f}); "
        + (
            f"NFE {shown['nfe']:.1f}, residual {shown['residual']:.2e}; "
            if "residual" in shown
            else ""
        )
        + f"evaluated in {time.perf_counter() - t0:.0f}s"
    )
    plot_metrics(
        workdir / "metrics.jsonl",
        workdir / "curves.png",
        panels={
            "loss": [("train", "loss"), ("val", "loss")],
            "val perplexity": [("val", "ppl")],
            "NFE": [("train", "nfe"), ("val", "nfe")],
            "relative residual": [("train", "residual"), ("val", "residual")],
        },
    )
    return results


def resolve_config(argv: list[str]) -> tuple[Config, pathlib.Path, bool]:
    """`--workdir` and `--resume` are run options; every other `--key=value` is a config field.
    With `--resume`, the run's saved config is the base and new overrides apply on top."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--resume", action="store_true")
    run, rest = parser.parse_known_args(argv)
    config, overrides = parse_config(CONFIGS, rest, default="small")
    name = next((a.split("=", 1)[1] for a in rest if a.startswith("--config=")), "small")
    workdir = pathlib.Path(run.workdir or f"runs/wikitext-{name}")
    latest = CheckpointManager(workdir).latest_path()
    if run.resume and latest is not None:
        base = config_from_dict(Config, read_header(latest)["config"])
        config = dataclasses.replace(base, **overrides)
        print(f"resuming with the config stored in {latest}")
    return config, workdir, run.resume


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    argv = initialize_distributed(argv)  # --distributed: before anything else uses JAX
    try:
        config, workdir, resume = resolve_config(argv)
    except ValueError as e:  # unknown key, bad value, ...
        sys.exit(f"error: {e}")
    try:
        train_and_evaluate(config, workdir, resume=resume)
    except (data.DataError, NonFiniteLossError, ShardingError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
