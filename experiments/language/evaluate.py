"""Evaluate a trained WikiText language model checkpoint: perplexity, NFE, solver residual.

    python -m experiments.language.evaluate --workdir=runs/lm-small                  # best.eqx on test
    python -m experiments.language.evaluate --workdir=runs/lm-small --checkpoint=latest --split=val
    python -m experiments.language.evaluate --workdir=runs/lm-small --max_steps=6    # more solver steps
    python -m experiments.language.evaluate --workdir=runs/lm-small --data-dir=../shared/data/wikitext-2-raw
    python -m experiments.language.evaluate --workdir=runs/lm-small --sweep-steps=1,2,3,4,6  # ppl vs NFE

The model is rebuilt from the config stored in the checkpoint header. Data options
(`--data-dir`, `--tokenizer-dir`, `--cache-dir`) and the solver's step budget and tolerance
(`--max_steps`, `--tol`: they change no parameter) may be overridden. Evaluation uses contiguous
non-overlapping windows of `seq_len` tokens covering the whole split (every token but the first is
predicted once, with the context available inside its window). Results are printed and written to
`<workdir>/eval-<checkpoint>-<split>.json`.

`--sweep-steps=1,2,...` also evaluates the same weights at each of those solver step budgets (the
analogue of the paper's Table 2, perplexity against NFE, at test time) with ONE compiled
evaluation step: the model is built with the largest budget as its `max_steps` ceiling and each
budget is a traced `step_budget` (`rdeq.DEQ(..., step_budget=...)`), which gives the numbers of a
model compiled with `max_steps` set to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp

from experiments.common import config as cfg
from experiments.common.checkpoint import CheckpointError, load_checkpoint, read_header
from experiments.common.optim import count_params

from . import data, train
from .configs import Config


def nfe_sweep(
    model, tokens, config: Config, max_tokens: int | None, steps: Sequence[int]
) -> list[dict]:
    """Perplexity and solver statistics at each solver step budget in `steps`, from one
    compiled `train.eval_step`: the budget is a traced int32 scalar. `model`'s `max_steps`
    is the ceiling and must be at least `max(steps)`."""
    ceiling = model.deq.max_steps
    if max(steps) > ceiling:
        raise cfg.ConfigError(
            f"--sweep-steps={max(steps)} exceeds the model's max_steps={ceiling}; build the "
            "model with the largest budget as max_steps"
        )
    return [
        {"max_steps": s}
        | train.evaluate(model, tokens, config, max_tokens, step_budget=jnp.asarray(s, jnp.int32))
        for s in steps
    ]


def evaluate_checkpoint(
    path: str | pathlib.Path,
    *,
    split: str = "test",
    max_tokens: int | None = None,
    sweep_steps: Sequence[int] = (),
    **overrides,
) -> dict:
    """Perplexity and solver statistics of the checkpoint at `path` on `split` ("val" or "test").

    `overrides` replace fields of the stored config that leave the parameters unchanged
    (data location, `max_steps`, `tol`, `eval_batch_size`). `sweep_steps`: also evaluate at
    each of these solver step budgets (`results["sweep"]`, see `nfe_sweep`); the main
    result then comes from the same compiled step, at a budget of `max_steps`.
    """
    config = cfg.from_dict(Config, read_header(path)["config"])
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    budget = None
    if sweep_steps:
        if config.model != "deq":
            raise cfg.ConfigError(f"--sweep-steps needs a DEQ model, got --model={config.model}")
        if min(sweep_steps) < 0:
            raise cfg.ConfigError(f"--sweep-steps={min(sweep_steps)}: budgets must be >= 0")
        # One ceiling for the main result and every budget: one compiled evaluation step.
        budget = jnp.asarray(config.max_steps, jnp.int32)
        config = dataclasses.replace(config, max_steps=max(config.max_steps, *sweep_steps))
    skeleton = eqx.filter_eval_shape(train.init_state, config)
    state, header = load_checkpoint(path, like=skeleton)
    splits = data.splits_for(config)
    tokens = {"val": splits.val, "test": splits.test}[split]
    results = train.evaluate(state.model, tokens, config, max_tokens, step_budget=budget)
    if sweep_steps:
        results["sweep"] = nfe_sweep(state.model, tokens, config, max_tokens, sweep_steps)
    return {
        "checkpoint": str(path),
        "step": header.get("step"),
        "split": split,
        "params": count_params(state.model),
        **results,
        "unigram": data.unigram_perplexity(splits.train, tokens),
        "data": splits.description,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument(
        "--checkpoint", default="best", help="best | latest | a path to a .eqx file"
    )
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--max-tokens", "--max_tokens", type=int, default=None)
    parser.add_argument("--data-dir", "--data_dir", default=None)
    parser.add_argument("--tokenizer-dir", "--tokenizer_dir", default=None)
    parser.add_argument("--cache-dir", "--cache_dir", default=None)
    parser.add_argument("--max-steps", "--max_steps", type=int, default=None)
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--eval-batch-size", "--eval_batch_size", type=int, default=None)
    parser.add_argument(
        "--sweep-steps",
        "--sweep_steps",
        type=lambda text: tuple(int(t) for t in text.split(",") if t.strip()),
        default=(),
        help="comma-separated solver step budgets to also evaluate at, e.g. 1,2,3,4,6",
    )
    args = parser.parse_args(argv)

    workdir = pathlib.Path(args.workdir)
    path = {"best": workdir / "best.eqx", "latest": workdir / "latest.eqx"}.get(
        args.checkpoint, pathlib.Path(args.checkpoint)
    )
    if args.checkpoint == "best" and not path.is_file():
        path = workdir / "latest.eqx"
    if not path.is_file():
        sys.exit(f"error: no checkpoint {args.checkpoint!r} in {workdir} (train first)")
    try:
        options = {k: v for k, v in vars(args).items() if k not in ("workdir", "checkpoint")}
        results = evaluate_checkpoint(path, **options)  # the CLI names are its keywords
    except (data.DataError, CheckpointError, cfg.ConfigError) as e:
        sys.exit(f"error: {e}")
    out = workdir / f"eval-{path.stem}-{args.split}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    solver = (
        f", NFE {results['nfe']:.2f}, residual {results['residual']:.3e}"
        if "residual" in results
        else ""
    )
    print(
        f"{path} (step {results['step']}): {args.split} perplexity {results['ppl']:.2f} "
        f"over {results['tokens']:,} tokens{solver}; unigram baseline {results['unigram']['fitted']:.1f} "
        f"(fitted on train), {results['unigram']['oracle']:.1f} (oracle); written to {out}"
    )
    for row in results.get("sweep", []):
        print(
            f"  {row['max_steps']:>3} steps: NFE {row['nfe']:.2f}, {args.split} perplexity "
            f"{row['ppl']:.2f}, residual {row['residual']:.3e}"
        )


if __name__ == "__main__":
    main()
