"""Compare RevDEQ (multi- and single-scale) with DEQ-IFT, an explicit ResNet-18 and an augmented
Neural ODE on CIFAR-10, at matched optimiser steps and at matched wall-clock, over seeds
(`make reproduce-cifar`: Table 3's multi-scale small row at CPU scale).

    python -m experiments.vision.compare --budget-min=90 --seeds=0,1   # the `repro` base, ~90 min
    python -m experiments.vision.compare --train-steps=200 --models=revdeq-multiscale,resnet18
    python -m experiments.vision.compare --base=paper-170k --train-steps=70300   # the paper's 100 epochs

Every model is trained by `experiments.vision.train` with the same data, batch size, optimiser,
schedule and number of steps (the `--base` config, `repro` by default), once per seed, in
`<workdir>/<model>-seed<k>/`. The step count is the plan (`<workdir>/plan.json`):
`--train-steps=N`, or from `--budget-min` (the whole comparison's
wall-clock), after compiling and timing every model's step. Invoking it again continues:
finished runs are skipped, partial ones resumed from their checkpoint, the plan is reused.
Writes `results/compare.md` (both views; mean and min-max over seeds), `results/compare.json`
and `results/compare_curves.png` (validation accuracy against training wall-clock).

Columns: parameters; NFE (mean forward evaluations of the equilibrium functions per test image;
"-" for explicit models); training throughput (images/s, median over log windows, compilation
excluded; this machine's, under whatever else runs on it); peak memory of one compiled train step
(XLA `memory_analysis()` of the jitted step at the run's batch size: arguments + outputs +
temporaries, minus aliased buffers; a compile-time figure, not a measured high-water mark); test
accuracy of the checkpoint with the best validation accuracy (held-out training images).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax

from experiments.common import config as cfg, reproduce as rep
from experiments.common.metrics import read_metrics
from experiments.common.optim import count_params
from experiments.common.plotting import plot_series

from . import data as vdata
from .configs import Config, CONFIGS, DEQ_IFT_JAC_REG
from .train import init_state, make_train_step, train


# name -> (label, overrides on the base config). Sizes chosen for ~170-210K parameters where the
# CPU budget allows it (single-scale and the ODE are narrower: at full width one step of either
# costs 10-30x the multi-scale model at 32x32 resolution).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "revdeq-multiscale": ("RevDEQ multi-scale (reversible, exact state)", {}),
    "deq-ift-multiscale": (
        "DEQ multi-scale (Anderson + implicit/IFT grad, Jacobian reg.)",
        {"solver": "anderson", "adjoint": "implicit", "jac_reg": DEQ_IFT_JAC_REG},
    ),
    "revdeq-single-scale": (
        "RevDEQ single-scale",
        {
            "model": "single-scale",
            "channels": (16,),
            "width": (2,),
            "max_steps": (2,),
        },
    ),
    "resnet18": (
        "ResNet-18 (explicit, width matched to RevDEQ's parameters)",
        {"model": "resnet18"},  # resnet_width: matched_resnet_width(base)
    ),
    "anode": (
        "Augmented Neural ODE (diffrax, Tsit5, 2 steps)",
        {"model": "anode", "ode_hidden": 16, "ode_steps": 2},
    ),
}
RESULTS_DIR = pathlib.Path(__file__).parent / "results"


REPRODUCE = ("revdeq-multiscale", "deq-ift-multiscale", "resnet18", "anode")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    base: str = "repro"  # training setup shared by all models (a name in configs.CONFIGS)
    models: tuple[str, ...] = REPRODUCE  # which entries of MODELS to run
    seeds: tuple[int, ...] = (0, 1)  # one run per model and seed
    train_steps: int | None = None  # this many (>= 1), or None: from budget_min
    budget_min: float = 90.0  # wall-clock of the whole comparison (train_steps not given)
    data_dir: str | None = None
    workdir: str = "runs/reproduce-cifar"
    out: str = str(RESULTS_DIR)  # where compare.md/.json/.png go


def matched_resnet_width(base: Config) -> int:
    """The ResNet-18 base width whose parameter count is closest to the multi-scale RevDEQ's."""

    def params(config: Config) -> int:
        state = eqx.filter_eval_shape(init_state, config)
        return count_params(state.model)

    target = params(dataclasses.replace(base, model="implicit-resnet"))
    widths = range(2, 65, 2)
    counts = {
        w: params(dataclasses.replace(base, model="resnet18", resnet_width=w)) for w in widths
    }
    return min(widths, key=lambda w: abs(counts[w] - target))


def model_config(base: Config, name: str, train_steps: int, seed: int = 0) -> Config:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}.")
    changes = dict(MODELS[name][1])
    if name == "resnet18":
        changes["resnet_width"] = matched_resnet_width(base)
    if train_steps > 0:
        evals = max(1, train_steps // 4)
        changes |= {"train_steps": train_steps, "eval_every": evals, "checkpoint_every": evals}
        changes["log_every"] = max(1, min(base.log_every, evals))
    return dataclasses.replace(base, seed=seed, **changes)


def profile(config: Config, dataset: vdata.CIFAR10) -> dict:
    """Compile time, seconds per train step (real batches) and compiled memory of `config`."""
    batches = vdata.Batches(dataset.x_train, dataset.y_train, config.batch_size, 0)
    return rep.profile_step(make_train_step(config), init_state(config), batches.get)


def summarise(name: str, config: Config, workdir: pathlib.Path) -> dict:
    """One run's row: parameters, NFE, throughput, accuracies, the validation curve."""
    records = read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    if not any(r["split"] == "val" for r in records):
        raise RuntimeError(f"{workdir} has no evaluation records; did the run finish?")
    rates = [r["images_per_s"] for r in train if "images_per_s" in r]
    results = json.loads((workdir / "results.json").read_text())
    seconds = rep.training_seconds(records)
    return {
        "seed": config.seed,
        "params": results["params"],
        "nfe": results["test"].get("nfe"),  # the library's count (with the initial f(z0))
        "images_per_s": statistics.median(rates) if rates else None,
        "train_seconds": seconds[max(seconds)],
        "val_acc": results["val"]["acc"],
        "test_acc": results["test"]["acc"],
        "test_loss": results["test"]["loss"],
        "steps": max(r["step"] for r in train),
        "curve": rep.val_curve(records, "acc"),
    }


def paper_nfe(config: Config) -> int | None:
    """The paper's count for a reversible multi-scale model: 2 per step, summed over the
    scales (Table 3 counts the solver steps' evaluations)."""
    if config.model == "implicit-resnet" and config.solver == "reversible":
        return 2 * sum(config.max_steps)
    return None


def write_report(
    rows: dict[str, dict], options: CompareConfig, plan: dict, n_test: int
) -> pathlib.Path:
    out = pathlib.Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = rep.matched_seconds(r["runs"] for r in rows.values())
    for r in rows.values():
        at = [rep.at_time(run["curve"], seconds, max) for run in r["runs"]]
        r |= {
            k: rep.spread([run[k] for run in r["runs"]])
            for k in ("val_acc", "test_acc", "images_per_s", "train_seconds", "nfe")
        }
        r["at_matched_time"] = {
            "val_acc": rep.spread([a[1] if a else None for a in at]),
            "steps": rep.spread([a[0] if a else None for a in at]),
        }
    base = CONFIGS[options.base]
    steps_table = rep.markdown_table(
        ["model", "params", "NFE", "steps", "train wall-clock (s)", "images/s",
         "train-step memory (MiB)", "val acc (%)", "test acc (%)"],
        [[r["label"], f"{r['runs'][0]['params']:,}",
          str(r["paper_nfe"]) if r["paper_nfe"] else rep.fmt_spread(r["nfe"], ".1f"),
          str(plan["train_steps"]), rep.fmt_spread(r["train_seconds"], ".1f"),
          rep.fmt_spread(r["images_per_s"], ".1f"), rep.mib(r["profile"].get("peak_bytes")),
          rep.fmt_spread(r["val_acc"], ".1f", 100), rep.fmt_spread(r["test_acc"], ".1f", 100)]
         for r in rows.values()],
    )  # fmt: skip
    time_table = rep.markdown_table(
        ["model", "steps reached", f"val acc within {seconds:.0f} s (%)"],
        [[r["label"], rep.fmt_spread(r["at_matched_time"]["steps"], ".0f"),
          rep.fmt_spread(r["at_matched_time"]["val_acc"], ".1f", 100)] for r in rows.values()],
    )  # fmt: skip
    lines = [
        "# CIFAR-10: RevDEQ vs baselines at matched steps and at matched wall-clock",
        "",
        f"Base config `{options.base}`: {plan['train_steps']} steps of batch {base.batch_size}, "
        f"schedule {base.schedule}, lr {base.lr}, augmentation {'on' if base.augment else 'off'}; "
        f"seeds {list(options.seeds)}, mean (min-max) over seeds; test accuracy of the best "
        f"validation checkpoint on {n_test} test images. Device: "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}).",
        "",
        "## At matched optimiser steps",
        "",
        steps_table,
        "",
        "## At matched wall-clock",
        "",
        f"Best validation accuracy reached within {seconds:.0f} s of training: the fastest "
        "model's mean training time, or the latest first validation if that comes later "
        "(`reproduce.matched_seconds`), so every model has a value. Slower models are caught "
        "mid-run; a model whose whole run fits in the window shows its final best.",
        "",
        time_table,
        "",
        "NFE: RevDEQ, the paper's count (2 per reversible step, summed over the scales; "
        "`compare.json` has the library's, which adds each block's initial f(z0)); other DEQs "
        "and the ODE, the mean evaluations per test image; '-' for explicit models. Memory: "
        "XLA `memory_analysis()` of the compiled train step (arguments + outputs + temporaries "
        "- aliased), not a measured peak. Throughput: median over log windows, compilation "
        "excluded, on a shared machine.",
        "",
    ]
    md = out / "compare.md"
    md.write_text("\n".join(lines))
    (out / "compare.json").write_text(json.dumps({"plan": plan, "rows": rows}, indent=2) + "\n")
    series = {
        f"{r['label']} (seed {run['seed']})": ([t for _, t, _ in run["curve"]],
                                              [v for _, _, v in run["curve"]])
        for r in rows.values() for run in r["runs"] if run["curve"]
    }  # fmt: skip
    plot_series(
        series, out / "compare_curves.png", xlabel="training wall-clock (s)",
        ylabel="validation accuracy", title=f"CIFAR-10 validation accuracy ({options.base})",
        logx=True,  # ResNet-18 trains ~40x faster per step than the implicit models
    )  # fmt: skip
    return md


def parse_options(argv: Sequence[str]) -> CompareConfig:
    """The comparison's options from `--key=value` flags. **Raises:** `SystemExit` with the
    reason for a bad flag."""
    try:
        return cfg.from_args(list(argv), {"default": CompareConfig()}, default="default")
    except cfg.ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    if options.base not in CONFIGS:
        raise SystemExit(f"error: --base={options.base}: unknown; choose from {', '.join(CONFIGS)}")
    unknown = [m for m in options.models if m not in MODELS]
    if unknown or not options.models or not options.seeds:
        raise SystemExit(
            f"error: give seeds and models, from {', '.join(MODELS)} (unknown: {unknown})"
        )
    base = dataclasses.replace(CONFIGS[options.base], data_dir=options.data_dir)
    dataset = vdata.load_cifar10(base.data_dir, download=base.download)
    workdir = pathlib.Path(options.workdir)

    def make_plan() -> dict:
        profiles = {}
        for name in options.models:
            print(f"timing {name} ...", flush=True)
            profiles[name] = profile(model_config(base, name, 0), dataset)
        steps = options.train_steps if options.train_steps is not None else rep.steps_for_budget(
            options.budget_min, [p["seconds_per_step"] for p in profiles.values()],
            len(options.seeds),
        )  # fmt: skip
        return {"train_steps": steps, "profile": profiles}

    budget = options.budget_min if options.train_steps is None else 0.0
    try:
        plan = rep.load_plan(workdir / rep.PLAN_FILE, budget, make_plan)
    except rep.ReproduceError as e:
        raise SystemExit(f"error: {e}") from None
    rows: dict[str, dict] = {}
    for name in options.models:
        runs = []
        for seed in options.seeds:
            config = model_config(base, name, plan["train_steps"], seed)
            run_dir = workdir / f"{name}-seed{seed}"
            status = rep.run_status(run_dir)
            print(f"=== {run_dir.name}: {MODELS[name][0]}: {status}", flush=True)
            if status != "done":
                train(config, run_dir, name=name, resume=status == "partial", dataset=dataset)
            runs.append(summarise(name, config, run_dir))
        rows[name] = {
            "label": MODELS[name][0],
            "config": cfg.to_dict(config),
            "paper_nfe": paper_nfe(config),
            "profile": plan["profile"].get(name) or profile(config, dataset),
            "runs": runs,
        }
    n_test = min(len(dataset.x_test), base.test_size or 10**9)
    md = write_report(rows, options, plan, n_test)
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
