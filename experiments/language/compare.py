"""RevDEQ vs DEQ with implicit gradients vs an explicit transformer, and a RevDEQ NFE sweep, on `small`.

    python -m experiments.language.compare --data-dir=../shared/data/wikitext-2-raw
    python -m experiments.language.compare --data-dir=... --budget_s=120 --variants=revdeq,deq-ift,explicit

The small-scale analogue of the paper's Tables 1 and 2. Every variant starts from the `small`
config (plus any `--key=value` config overrides given here) and gets the SAME wall-clock training
budget (`--budget_s` seconds, compilation and evaluation excluded): its step time is measured
first on real batches, and `train_steps` is set to `budget_s / step_time`, so that its cosine
schedule ends when the budget does. Variants:

    revdeq      Reversible(beta) + ReversibleAdjoint, 4 steps (paper: 8 NFE)
    deq-ift     Anderson (8 steps) forward + ImplicitAdjoint backward (classic DEQ), with the
                Jacobian regularisation of Bai et al. 2021 (`jac_reg`, configs.DEQ_IFT_JAC_REG)
    explicit    explicit transformer, 4 distinct layers, width chosen to match RevDEQ's parameters
    nfe-K       RevDEQ with K/2 reversible steps, K in {2, 4, 6, 12} (8 is `revdeq`)

Written to `--out` (default `experiments/language/results/`): `compare.md` (table: parameters,
NFE, tokens/s, compiled memory of the train step, best validation perplexity), `compare.json`,
and `ppl_vs_time.png` (validation perplexity against training wall-clock). Runs (checkpoints,
metrics) go to `--runs` (default `runs/compare/`).

NFE: the library's `Solution.nfe` counts every call of the layer, including the initial `f(z0)`
that the reversible solver evaluates before its first step, so `max_steps=N` reports `2N + 1`;
the paper counts `2N`. Both are in the table. Peak memory is XLA's compile-time
`memory_analysis()` of the jitted train step (arguments + outputs + temporaries - aliased),
not a measured resident set size; the temporaries column is the part that depends on the model's
activations and the gradient strategy.
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
import jax.numpy as jnp
import numpy as np

from experiments.common import config as cfg
from experiments.common.metrics import read_metrics
from experiments.common.plotting import plot_series

from . import data, train
from .configs import Config, CONFIGS, DEQ_IFT_JAC_REG
from .model import make_model


RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def variants(base: Config) -> dict[str, tuple[str, Config]]:
    """name -> (label, config) for every variant of the comparison."""
    out = {
        "revdeq": (
            f"RevDEQ ({base.max_steps} rev. steps)",
            dataclasses.replace(base, model="deq"),
        ),
        "deq-ift": (
            "DEQ-IFT (Anderson + implicit)",
            dataclasses.replace(
                base,
                model="deq",
                solver="anderson",
                adjoint="implicit",
                max_steps=8,
                jac_reg=DEQ_IFT_JAC_REG,
            ),
        ),
    }
    explicit = dataclasses.replace(base, model="explicit", num_layers=4)
    explicit = dataclasses.replace(
        explicit, dim=matched_dim(explicit, count_params_of(out["revdeq"][1]))
    )
    out["explicit"] = (
        f"Explicit ({explicit.num_layers} layers, d={explicit.dim})",
        explicit,
    )
    for nfe in (2, 4, 6, 12):
        cfg = dataclasses.replace(
            base,
            model="deq",
            solver="reversible",
            adjoint="reversible",
            max_steps=nfe // 2,
        )
        out[f"nfe-{nfe}"] = (f"RevDEQ ({nfe // 2} rev. steps)", cfg)
    return out


def count_params_of(config: Config) -> int:
    """Parameters of `make_model(config)`, from shapes only (nothing is allocated)."""
    shapes = eqx.filter_eval_shape(make_model, config, key=jax.random.key(0))
    leaves = jax.tree.leaves(shapes)
    return sum(
        int(np.prod(x.shape))
        for x in leaves
        if isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)
    )


def matched_dim(config: Config, target: int) -> int:
    """The width (a multiple of `num_heads`) whose parameter count is closest to `target`."""
    best = None
    for dim in range(config.num_heads, 2 * config.dim + 1, config.num_heads):
        n = count_params_of(dataclasses.replace(config, dim=dim))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (dim, n)
    assert best is not None
    return best[0]


def profile_step(config: Config, splits: data.TokenSplits, *, steps: int = 3) -> dict:
    """Seconds per train step (after compilation, on real batches) and XLA's compiled memory."""
    state, step = train.init_state(config), train.make_train_step(config)

    def batch(i):
        return data.get_batch(
            splits.train,
            i,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            seed=config.seed,
        )

    key = jax.random.key(0)
    compiled = step.lower(state, batch(0), key).compile()  # equinox's wrapper of jax's Compiled
    memory = compiled.compiled.memory_analysis()
    state, metrics = compiled(state, batch(0), key)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        state, metrics = compiled(state, batch(i), jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    mem = {}
    if memory is not None:
        mem = {
            "temp_bytes": int(memory.temp_size_in_bytes),
            "peak_bytes": int(
                memory.argument_size_in_bytes
                + memory.output_size_in_bytes
                + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes
            ),
        }
    return {"seconds_per_step": seconds, **mem}


def training_seconds(records: list[dict]) -> dict[int, float]:
    """Cumulative training wall-clock at each logged step, from the train records' `ms_per_step`
    (steps before the first measurement, i.e. compilation, are charged at the first measured rate)."""
    train_records = sorted((r for r in records if r["split"] == "train"), key=lambda r: r["step"])
    rates = [r.get("ms_per_step") for r in train_records]
    first = next((v for v in rates if v is not None), 0.0)
    elapsed, previous, out, rate = 0.0, 0, {0: 0.0}, first
    for r, ms in zip(train_records, rates):
        rate = ms if ms is not None else rate
        elapsed += rate * (r["step"] - previous) / 1e3
        previous = r["step"]
        out[r["step"]] = elapsed
    return out


def run_variant(
    name: str,
    label: str,
    config: Config,
    splits,
    *,
    budget_s: float,
    runs: pathlib.Path,
) -> dict:
    print(f"\n=== {name}: {label}")
    profile = profile_step(config, splits)
    total = max(10, int(budget_s / profile["seconds_per_step"]))
    config = dataclasses.replace(
        config,
        train_steps=total,
        warmup_steps=min(config.warmup_steps, total // 10),
        log_every=max(1, total // 50),
        eval_every=max(1, total // 4),
        checkpoint_every=total,
    )
    print(
        f"{profile['seconds_per_step']:.2f} s/step -> {total} steps in the {budget_s:.0f}s budget"
    )
    results = train.train(config, runs / name, name=name, overwrite=True, final_test=False)
    records = read_metrics(runs / name / "metrics.jsonl")
    seconds = training_seconds(records)
    val = sorted((r for r in records if r["split"] == "val"), key=lambda r: r["step"])
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train" and "tokens_per_s" in r]
    return {
        "name": name,
        "label": label,
        "config": cfg.to_dict(config),
        "params": results["params"],
        "steps": total,
        "nfe": results["val"].get(
            "nfe", float(config.num_layers if config.model == "explicit" else "nan")
        ),
        "paper_nfe": 2 * config.max_steps
        if config.solver == "reversible" and config.model == "deq"
        else None,
        "residual": results["val"].get("residual"),
        "tokens_per_s": float(np.median(rates)) if rates else None,
        **profile,
        "val_ppl": results["val"]["ppl"],
        "curve": [(seconds.get(r["step"], float("nan")), r["ppl"]) for r in val],
    }


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def write_table(
    rows: list[dict],
    unigram: dict,
    out: pathlib.Path,
    budget_s: float,
    description: str,
) -> str:
    lines = [
        "# WikiText: RevDEQ vs DEQ-IFT vs explicit transformer (`small`, equal wall-clock)",
        "",
        f"Data: {description}. Each model trained for {budget_s:.0f}s of wall-clock (compilation and",
        "evaluation excluded) on a shared 2-core CPU; validation perplexity of the best checkpoint on",
        f"the held-out validation tokens. Unigram baseline on the same tokens: {unigram['fitted']:.1f}",
        f"(fitted on train, add-one), {unigram['oracle']:.1f} (oracle: the split's own frequencies).",
        "",
        "| model | params | NFE (library / paper) | final residual | steps | tokens/s | "
        "train-step memory, MiB (peak / temporaries) | val perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        nfe = f"{r['nfe']:.1f}" + (f" / {r['paper_nfe']}" if r["paper_nfe"] is not None else "")
        residual = "-" if r["residual"] is None else f"{r['residual']:.2e}"
        rate = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        lines.append(
            f"| {r['label']} | {r['params']:,} | {nfe} | {residual} | {r['steps']} | {rate} | "
            f"{_mib(r.get('peak_bytes'))} / {_mib(r.get('temp_bytes'))} | {r['val_ppl']:.1f} |"
        )
    lines += [
        "",
        "NFE: forward evaluations of the layer per sequence at evaluation (library count includes",
        "the initial f(z0); the paper counts 2 per reversible step). Memory: XLA compile-time",
        "`memory_analysis()` of the whole jitted train step. tokens/s: median over logged windows.",
        "",
    ]
    text = "\n".join(lines)
    (out / "compare.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--budget_s", "--budget-s", type=float, default=300.0)
    parser.add_argument("--variants", default="revdeq,deq-ift,explicit,nfe-2,nfe-4,nfe-6,nfe-12")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--runs", default="runs/compare")
    args, rest = parser.parse_known_args(argv)
    try:  # --key=value overrides of the base config (`small` unless --config=NAME)
        base = cfg.from_args(rest, CONFIGS, default="small")
    except cfg.ConfigError as e:
        sys.exit(f"error: {e}")
    out, runs = pathlib.Path(args.out), pathlib.Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    try:
        splits = data.splits_for(base)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    table = variants(base)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"error: unknown variants {unknown}; choose from {sorted(table)}")

    rows = []
    for name in names:
        label, config = table[name]
        rows.append(run_variant(name, label, config, splits, budget_s=args.budget_s, runs=runs))
        # rewrite after every variant, so partial results survive an interruption
        unigram = data.unigram_perplexity(splits.train, splits.val)
        (out / "compare.json").write_text(
            json.dumps(
                {"budget_s": args.budget_s, "unigram_val": unigram, "rows": rows},
                indent=2,
            )
            + "\n"
        )
        text = write_table(rows, unigram, out, args.budget_s, splits.description)
        plot_series(
            {r["label"]: ([t for t, _ in r["curve"]], [p for _, p in r["curve"]]) for r in rows},
            out / "ppl_vs_time.png",
            xlabel="training wall-clock (s)",
            ylabel="validation perplexity",
            title="WikiText-2 (small): perplexity vs wall-clock",
            logy=True,
        )
    print("\n" + text)


if __name__ == "__main__":
    main()
