"""The paper's Tables 1-2 at CPU scale: RevDEQ at 2-12 NFE vs DEQ-IFT vs an explicit
transformer, several seeds, each run resumable (`make reproduce-wikitext`).

    python -m experiments.language.compare --config=repro --data-dir=../shared/data/wikitext-2-raw \
        --budget_min=90 --seeds=0,1 --runs=runs/reproduce-wikitext
    python -m experiments.language.compare --config=tiny --train_steps=4 --variants=nfe-8,explicit

Every variant starts from the `--config` base (plus any `--key=value` config overrides) and is
trained for the SAME number of optimiser steps, once per seed, in `<runs>/<variant>-seed<k>/`.
The step count is the plan (`<runs>/plan.json`): `--train_steps=N`, or from `--budget_min`
(the whole comparison's wall-clock): every variant's step is compiled and timed on real
batches first, then `steps_for_budget` fills the budget (a quarter kept for compilation and
evaluation). Invoking it again continues: finished runs (with `results.json`) are skipped,
partial ones resumed from their checkpoint (`train --resume`), the plan is reused. Variants:

    nfe-K       RevDEQ: Reversible(beta) + ReversibleAdjoint, K/2 reversible steps (paper's count
                K = 2 per step), K in {2, 4, 6, 8, 12}; nfe-8 is the paper's model (Table 1)
    deq-ift     Anderson (8 steps) forward + ImplicitAdjoint backward (classic DEQ), with the
                Jacobian regularisation of Bai et al. 2021 (`jac_reg`, configs.DEQ_IFT_JAC_REG)
    deq-jfb     Anderson (8 steps) forward + PhantomAdjoint backward (Jacobian-free / phantom
                gradient, Geng et al. 2021): the cheap approximate-gradient DEQ
    explicit    explicit transformer, 4 distinct layers, width chosen to match RevDEQ's parameters

The RevDEQ trained at the largest NFE is also evaluated at every smaller step budget with ONE
compiled evaluation step (`evaluate.nfe_sweep`): perplexity vs test-time NFE beside perplexity
vs training NFE (Table 2).

Written to `--out` (default `experiments/language/results/`): `compare.md` (two tables: at
matched optimiser steps, and at matched wall-clock, i.e. the best validation perplexity each
variant reached within the training time of the fastest one; mean and min-max over seeds),
`compare.json` (every run, with the library's NFE count), `ppl_vs_nfe.png` (Table 2 analogue)
and `ppl_vs_time.png` (validation perplexity against training wall-clock).

NFE: the library's `Solution.nfe` counts every call of the layer, including the initial `f(z0)`
that the reversible solver evaluates before its first step, so `max_steps=N` reports `2N + 1`;
the paper counts `2N`, which is the table's count; the JSON has both. Memory is XLA's
compile-time `memory_analysis()` of the jitted train step (arguments + outputs + temporaries -
aliased), not a measured resident set size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import config as cfg, reproduce as rep
from experiments.common.metrics import read_metrics
from experiments.common.plotting import plot_series
from experiments.common.reproduce import training_seconds  # noqa: F401 - re-exported

from . import data, evaluate, train
from .configs import Config, CONFIGS, DEQ_IFT_JAC_REG
from .model import make_model


RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
NFES = (2, 4, 6, 8, 12)  # the paper's Table 2 (it also has 10)
DEFAULT_VARIANTS = (*(f"nfe-{k}" for k in NFES), "deq-ift", "deq-jfb", "explicit")


def variants(base: Config) -> dict[str, tuple[str, Config]]:
    """name -> (label, config) for every variant of the comparison."""
    revdeq = dataclasses.replace(base, model="deq", solver="reversible", adjoint="reversible")
    out = {
        f"nfe-{k}": (f"RevDEQ ({k} NFE)", dataclasses.replace(revdeq, max_steps=k // 2))
        for k in NFES
    }
    anderson = dataclasses.replace(base, model="deq", solver="anderson", max_steps=8)
    out["deq-ift"] = (
        "DEQ-IFT (Anderson + implicit, Jacobian reg.)",
        dataclasses.replace(anderson, adjoint="implicit", jac_reg=DEQ_IFT_JAC_REG),
    )
    out["deq-jfb"] = (
        "DEQ-JFB (Anderson + phantom gradient)",
        dataclasses.replace(anderson, adjoint="phantom"),
    )
    explicit = dataclasses.replace(base, model="explicit", num_layers=4, jac_reg=0.0)
    explicit = dataclasses.replace(
        explicit, dim=matched_dim(explicit, count_params_of(out["nfe-8"][1]))
    )
    out["explicit"] = (f"Explicit ({explicit.num_layers} layers, d={explicit.dim})", explicit)
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


def profile(config: Config, splits: data.TokenSplits) -> dict:
    """Compile time, seconds per train step (real batches) and compiled memory of `config`."""

    def batch(i: int):
        return data.get_batch(
            splits.train, i, batch_size=config.batch_size, seq_len=config.seq_len, seed=0
        )

    return rep.profile_step(train.make_train_step(config), train.init_state(config), batch)


def schedule(config: Config, train_steps: int, seed: int) -> Config:
    """`config` for one run of the plan: its length, seed, and ~6 validations (the curves)."""
    log = max(1, min(config.log_every, train_steps // 20))
    evals = log * max(1, round(train_steps / 6 / log))  # logged steps: timed (the curves' x)
    return dataclasses.replace(
        config,
        seed=seed,
        train_steps=train_steps,
        epochs=0.0,
        warmup_steps=min(config.warmup_steps, train_steps // 10),
        log_every=log,
        eval_every=evals,
        checkpoint_every=evals,
    )


def run_one(name: str, config: Config, workdir: pathlib.Path, sweep: tuple[int, ...]) -> dict:
    """Train (or resume, or skip when finished) one run; its row of the JSON."""
    status = rep.run_status(workdir)
    print(f"\n=== {workdir.name}: {status}", flush=True)
    if status != "done":
        train.train(config, workdir, name=name, resume=status == "partial")
    results = json.loads((workdir / "results.json").read_text())
    if sweep and "sweep" not in results:  # test perplexity at each smaller step budget
        best = workdir / ("best.eqx" if (workdir / "best.eqx").is_file() else "latest.eqx")
        rows = evaluate.evaluate_checkpoint(
            best, split="test", max_tokens=config.test_tokens, sweep_steps=sweep,
            data_dir=config.data_dir, cache_dir=config.cache_dir,
        )["sweep"]  # fmt: skip
        results["sweep"] = [
            {"paper_nfe": 2 * r["max_steps"], "nfe": r["nfe"], "test_ppl": r["ppl"]} for r in rows
        ]
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    records = read_metrics(workdir / "metrics.jsonl")
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train" and "tokens_per_s" in r]
    seconds = training_seconds(records)
    deq = config.model == "deq"
    return {
        "seed": config.seed,
        "params": results["params"],
        "steps": config.train_steps,
        "train_seconds": seconds[max(seconds)],
        "tokens_per_s": float(np.median(rates)) if rates else None,
        # the library's count (with the initial f(z0)) and the paper's (2 per reversible step)
        "nfe": results["val"].get("nfe", config.num_layers if not deq else None),
        "paper_nfe": 2 * config.max_steps if deq and config.solver == "reversible" else None,
        "residual": results["val"].get("residual"),
        "val_ppl": results["val"]["ppl"],
        "test_ppl": (results["test"] or {}).get("ppl"),
        "curve": rep.val_curve(records, "ppl"),
        "sweep": results.get("sweep", []),
    }


def summarise(rows: dict[str, dict], seconds: float) -> None:
    """Add the seed spreads, and the matched-wall-clock view at `seconds`, to every row."""
    for row in rows.values():
        runs = row["runs"]
        at = [rep.at_time(r["curve"], seconds, min) for r in runs]
        row |= {
            key: rep.spread([r[key] for r in runs])
            for key in ("val_ppl", "test_ppl", "train_seconds", "tokens_per_s", "nfe")
        }
        row["at_matched_time"] = {
            "val_ppl": rep.spread([a[1] if a else None for a in at]),
            "steps": rep.spread([a[0] if a else None for a in at]),
        }


def _nfe(row: dict) -> str:
    """The paper's count for RevDEQ; the mean evaluations of the layer for the DEQ baselines
    (their solver stops on the tolerance: no fixed count)."""
    paper = row["runs"][0]["paper_nfe"]
    return str(paper) if paper is not None else rep.fmt_spread(row["nfe"], ".1f")


def write_report(
    rows: dict[str, dict], out: pathlib.Path, plan: dict, unigram: dict, description: str
) -> str:
    """`compare.md`, `compare.json`, `ppl_vs_nfe.png`, `ppl_vs_time.png` into `out`."""
    seconds = rep.matched_seconds(r["runs"] for r in rows.values())
    summarise(rows, seconds)
    seeds = sorted({run["seed"] for r in rows.values() for run in r["runs"]})
    steps_table = rep.markdown_table(
        ["model", "params", "NFE (paper)", "steps", "train wall-clock (s)", "tokens/s",
         "train-step memory (MiB)", "val perplexity", "test perplexity"],
        [
            [
                r["label"], f"{r['runs'][0]['params']:,}",
                _nfe(r) if r["config"]["model"] == "deq"
                else f"{r['config']['num_layers']} layers",
                str(r["runs"][0]["steps"]), rep.fmt_spread(r["train_seconds"], ".1f"),
                rep.fmt_spread(r["tokens_per_s"], ",.0f"), rep.mib(r["profile"].get("peak_bytes")),
                rep.fmt_spread(r["val_ppl"], ".1f"), rep.fmt_spread(r["test_ppl"], ".1f"),
            ]
            for r in rows.values()
        ],
    )  # fmt: skip
    time_table = rep.markdown_table(
        ["model", "steps reached", f"val perplexity within {seconds:.0f} s"],
        [
            [r["label"], rep.fmt_spread(r["at_matched_time"]["steps"], ".0f"),
             rep.fmt_spread(r["at_matched_time"]["val_ppl"], ".1f")]
            for r in rows.values()
        ],
    )  # fmt: skip
    text = "\n".join([
        "# WikiText: RevDEQ at 2-12 NFE vs DEQ-IFT vs explicit transformer",
        "",
        f"Data: {description}. Unigram baseline on the validation tokens: "
        f"{unigram['fitted']:.1f} (fitted on train, add-one), {unigram['oracle']:.1f} (oracle).",
        f"Plan: {plan['train_steps']} optimiser steps per run, seeds {seeds}; values are the mean"
        " (min-max) over seeds, perplexity of the best validation checkpoint.",
        "",
        "## At matched optimiser steps",
        "",
        steps_table,
        "",
        "## At matched wall-clock",
        "",
        f"Best validation perplexity reached within {seconds:.0f} s of training: the mean training"
        " time of the fastest model, or the latest first validation if that comes later"
        " (`reproduce.matched_seconds`). Slower models are caught mid-schedule (learning rate not"
        " yet decayed), which this view charges to them.",
        "",
        time_table,
        "",
        "NFE: RevDEQ, the paper's count, 2 per reversible step (`compare.json` also has the"
        " library's, which adds the initial f(z0)); DEQ baselines, the mean evaluations of the"
        " layer at validation (Anderson stops on the tolerance)."
        " Memory: XLA's compile-time `memory_analysis()` of the whole jitted train step."
        " tokens/s: median over logged windows, compilation excluded, on a shared machine.",
        "",
    ])  # fmt: skip
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(
        json.dumps({"plan": plan, "unigram_val": unigram, "rows": rows}, indent=2) + "\n"
    )
    revdeq = {k: r for k, r in rows.items() if r["runs"][0]["paper_nfe"] is not None}
    series: dict[str, tuple[list[float], list[float]]] = {}
    if revdeq:
        points = sorted((r["runs"][0]["paper_nfe"], r["test_ppl"]) for r in revdeq.values())
        series["RevDEQ, trained at each NFE"] = (
            [float(n) for n, _ in points], [s["mean"] if s else math.nan for _, s in points]
        )  # fmt: skip
        sweeps = [run["sweep"] for r in revdeq.values() for run in r["runs"] if run["sweep"]]
        if sweeps:
            nfes = [float(p["paper_nfe"]) for p in sweeps[0]]
            means = [float(np.mean([sw[i]["test_ppl"] for sw in sweeps])) for i in range(len(nfes))]
            series[f"RevDEQ {max(nfes):.0f} NFE, evaluated at fewer"] = (nfes, means)
    for r in rows.values():
        if r["config"]["model"] == "deq" and r["runs"][0]["paper_nfe"] is None and r["nfe"]:
            series[r["label"]] = ([r["nfe"]["mean"]], [r["test_ppl"]["mean"]])
    if series:
        plot_series(
            series, out / "ppl_vs_nfe.png", xlabel="NFE (RevDEQ: paper's count; DEQ: library's)",
            ylabel="test perplexity", title="WikiText: perplexity vs NFE (Table 2 analogue)",
            logy=True,
        )  # fmt: skip
    plot_series(
        {
            f"{r['label']} (seed {run['seed']})": ([t for _, t, _ in run["curve"]],
                                                  [v for _, _, v in run["curve"]])
            for r in rows.values() for run in r["runs"]
        },
        out / "ppl_vs_time.png", xlabel="training wall-clock (s)",
        ylabel="validation perplexity", title="WikiText: perplexity vs wall-clock", logy=True,
    )  # fmt: skip
    return text


def main(argv: list[str] | None = None) -> dict[str, dict]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--budget_min", "--budget-min", type=float, default=90.0)
    parser.add_argument("--train_steps", "--train-steps", type=int, default=0)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--runs", default="runs/reproduce-wikitext")
    args, rest = parser.parse_known_args(argv)
    try:  # --key=value overrides of the base config (`repro` unless --config=NAME)
        base = cfg.from_args(rest, CONFIGS, default="repro")
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except (cfg.ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    out, runs = pathlib.Path(args.out), pathlib.Path(args.runs)
    table = variants(base)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names or not seeds:
        sys.exit(f"error: give seeds and variants, from {sorted(table)} (unknown: {unknown})")
    try:
        splits = data.splits_for(base)
    except data.DataError as e:
        sys.exit(f"error: {e}")

    def make_plan() -> dict:
        profiles = {}
        for name in names:
            print(f"timing {name} ...", flush=True)
            profiles[name] = profile(table[name][1], splits)
        steps = args.train_steps or rep.steps_for_budget(
            args.budget_min, [p["seconds_per_step"] for p in profiles.values()], len(seeds)
        )
        return {"train_steps": steps, "seeds": seeds, "variants": names, "profile": profiles}

    budget = 0.0 if args.train_steps else args.budget_min
    try:
        plan = rep.load_plan(runs / rep.PLAN_FILE, budget, make_plan)
    except rep.ReproduceError as e:
        sys.exit(f"error: {e}")
    print(f"plan: {plan['train_steps']} steps x {len(names)} variants x seeds {seeds}")
    deq_steps = [table[n][1].max_steps for n in names if n.startswith("nfe-")]
    rows: dict[str, dict] = {}
    for name in names:
        label, config = table[name]
        sweep = tuple(range(1, config.max_steps + 1)) if deq_steps and (
            name.startswith("nfe-") and config.max_steps == max(deq_steps) > 1
        ) else ()  # fmt: skip
        rows[name] = {
            "label": label,
            "config": cfg.to_dict(config),
            "profile": plan["profile"].get(name) or profile(config, splits),
            "runs": [
                run_one(name, schedule(config, plan["train_steps"], seed),
                        runs / f"{name}-seed{seed}", sweep)
                for seed in seeds
            ],
        }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    unigram = data.unigram_perplexity(splits.train, splits.val)
    print("\n" + write_report(rows, out, plan, unigram, splits.description))
    return rows


if __name__ == "__main__":
    main()
