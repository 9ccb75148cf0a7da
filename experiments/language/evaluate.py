"""Evaluate a trained WikiText language model checkpoint: perplexity, NFE, solver residual.

    python -m experiments.language.evaluate --workdir=runs/lm-small                  # best.eqx on test
    python -m experiments.language.evaluate --workdir=runs/lm-small --checkpoint=latest --split=val
    python -m experiments.language.evaluate --workdir=runs/lm-small --max_steps=6    # more solver steps
    python -m experiments.language.evaluate --workdir=runs/lm-small --data-dir=../shared/data/wikitext-2-raw

The model is rebuilt from the config stored in the checkpoint header. Data options
(`--data-dir`, `--tokenizer-dir`, `--cache-dir`) and the solver's step budget and tolerance
(`--max_steps`, `--tol`: they change no parameter) may be overridden. Evaluation uses contiguous
non-overlapping windows of `seq_len` tokens covering the whole split (every token but the first is
predicted once, with the context available inside its window). Results are printed and written to
`<workdir>/eval-<checkpoint>-<split>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import equinox as eqx

from experiments.common import config as cfg
from experiments.common.checkpoint import CheckpointError, load_checkpoint, read_header
from experiments.common.optim import count_params

from . import data, train
from .configs import Config


def evaluate_checkpoint(
    path: str | pathlib.Path,
    *,
    split: str = "test",
    max_tokens: int | None = None,
    **overrides,
) -> dict:
    """Perplexity and solver statistics of the checkpoint at `path` on `split` ("val" or "test").

    `overrides` replace fields of the stored config that leave the parameters unchanged
    (data location, `max_steps`, `tol`, `eval_batch_size`).
    """
    config = cfg.from_dict(Config, read_header(path)["config"])
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    skeleton = eqx.filter_eval_shape(train.init_state, config)
    state, header = load_checkpoint(path, like=skeleton)
    splits = data.load_splits(
        data_dir=config.data_dir,
        hub_config=config.hub_config,
        splits=config.splits,
        holdout_fraction=config.holdout_fraction,
        tokenizer_dir=config.tokenizer_dir,
        cache_dir=config.cache_dir,
    )
    tokens = {"val": splits.val, "test": splits.test}[split]
    results = train.evaluate(state.model, tokens, config, max_tokens)
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
        results = evaluate_checkpoint(
            path,
            split=args.split,
            max_tokens=args.max_tokens,
            data_dir=args.data_dir,
            tokenizer_dir=args.tokenizer_dir,
            cache_dir=args.cache_dir,
            max_steps=args.max_steps,
            tol=args.tol,
            eval_batch_size=args.eval_batch_size,
        )
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


if __name__ == "__main__":
    main()
