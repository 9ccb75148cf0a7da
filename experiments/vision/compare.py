"""Compare RevDEQ (multi- and single-scale) with DEQ-IFT, an explicit ResNet-18 and an augmented
Neural ODE on CIFAR-10, at a matched training budget.

    python -m experiments.vision.compare                              # CPU-sized, all models
    python -m experiments.vision.compare --train-steps=200 --models=revdeq-multiscale,resnet18
    python -m experiments.vision.compare --base=paper-170k                   # full paper budget

Every model is trained by `experiments.vision.train` with the same data, batch size, optimiser,
schedule and number of steps (the `--base` config, `small` by default) in
`<workdir>/<model>/`; finished runs are reused (resumed, so nothing is retrained). Writes
`results/compare.md`, `results/compare.json` and `results/compare_curves.png`.

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

import jax
import jax.random as jr

from experiments.common import config as cfg
from experiments.common.metrics import read_metrics
from experiments.common.plotting import plot_series
from experiments.common.run import Run

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
        "ResNet-18 (explicit, width 8)",
        {"model": "resnet18", "resnet_width": 8},
    ),
    "anode": (
        "Augmented Neural ODE (diffrax, Tsit5)",
        {"model": "anode", "ode_hidden": 16, "ode_steps": 2},
    ),
}
RESULTS_DIR = pathlib.Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    base: str = "small"  # training setup shared by all models (a name in configs.CONFIGS)
    models: tuple[str, ...] = tuple(MODELS)  # which entries of MODELS to run
    train_steps: int = 0  # 0: the base config's
    data_dir: str | None = None
    workdir: str = "runs/cifar-compare"
    out: str = str(RESULTS_DIR)  # where compare.md/.json/.png go


def model_config(base: Config, name: str, train_steps: int) -> Config:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}.")
    changes = dict(MODELS[name][1])
    if train_steps > 0:
        changes["train_steps"] = train_steps
    return dataclasses.replace(base, **changes)


def compiled_memory(config: Config, dataset: vdata.CIFAR10) -> int | None:
    """Bytes XLA reserves for one train step: arguments + outputs + temporaries - aliases."""
    state, step = init_state(config), make_train_step(config)
    batch = vdata.Batches(dataset.x_train, dataset.y_train, config.batch_size, 0).get(0)
    try:
        # Equinox's `Compiled` wraps JAX's as `.compiled`.
        stats = step.lower(state, batch, jr.key(0)).compile().compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - some backends have no memory analysis
        print(f"memory_analysis unavailable: {type(e).__name__}: {e}")
        return None
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def summarise(name: str, config: Config, workdir: pathlib.Path, memory: int | None) -> dict:
    records = read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    if not val:
        raise RuntimeError(f"{workdir} has no evaluation records; did the run finish?")
    rates = [r["images_per_s"] for r in train if "images_per_s" in r]
    results = json.loads((workdir / "results.json").read_text())
    return {
        "name": name,
        "label": MODELS[name][0],
        "params": results["params"],
        "nfe": results["test"].get("nfe"),
        "images_per_s": statistics.median(rates) if rates else None,
        "train_step_memory_mb": None if memory is None else memory / 2**20,
        "test_acc": results["test"]["acc"],
        "test_loss": results["test"]["loss"],
        "steps": val[-1]["step"],
        "curve": [(r["step"], r["acc"]) for r in val],
        "train_loss": [(r["step"], r["loss"]) for r in train],
    }


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def write_report(
    rows: list[dict], options: CompareConfig, base: Config, n_test: int
) -> pathlib.Path:
    out = pathlib.Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = rows[0]["steps"] if rows else 0
    lines = [
        "# CIFAR-10: RevDEQ vs baselines at a matched training budget",
        "",
        f"Base config `{options.base}`: {steps} steps of batch {base.batch_size} "
        f"({steps * base.batch_size:,} images), schedule {base.schedule}, lr {base.lr}, "
        f"augmentation {'on' if base.augment else 'off'}; test accuracy on {n_test} test images. "
        f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()}).",
        "",
        "| model | params | NFE | images/s (train) | train-step memory (MB, compiled) | test acc (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['params']:,} | {_fmt(r['nfe'], '.1f')} | "
            f"{_fmt(r['images_per_s'], '.1f')} | {_fmt(r['train_step_memory_mb'], '.1f')} | "
            f"{100 * r['test_acc']:.1f} |"
        )
    lines += [
        "",
        "NFE: mean evaluations of the equilibrium function (all scales summed; for the ODE, "
        "vector-field evaluations) per test image. Memory: XLA `memory_analysis()` of the compiled "
        "train step (arguments + outputs + temporaries - aliased), not a measured peak. "
        "Throughput: median over log windows, compilation excluded, on a shared machine.",
        "",
    ]
    md = out / "compare.md"
    md.write_text("\n".join(lines))
    (out / "compare.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "train_loss"} for r in rows], indent=2)
    )
    series = {r["label"]: tuple(map(list, zip(*r["curve"]))) for r in rows if r["curve"]}
    plot_series(
        series,  # pyright: ignore[reportArgumentType]
        out / "compare_curves.png",
        xlabel="step",
        ylabel="test accuracy",
        title=f"CIFAR-10 test accuracy ({options.base} budget)",
    )
    return md


def main(argv: Sequence[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options = cfg.from_args(argv, {"default": CompareConfig()}, default="default")
    except cfg.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if options.base not in CONFIGS:
        raise SystemExit(f"error: --base={options.base}: unknown; choose from {', '.join(CONFIGS)}")
    base = dataclasses.replace(CONFIGS[options.base], data_dir=options.data_dir)
    dataset = vdata.load_cifar10(base.data_dir, download=base.download)
    rows = []
    for name in options.models:
        config = model_config(base, name, options.train_steps)
        workdir = pathlib.Path(options.workdir) / name
        print(f"=== {name}: {MODELS[name][0]} -> {workdir}", flush=True)
        resume = Run(workdir).saved_config() is not None  # a finished run is reused
        train(config, workdir, name=name, resume=resume, dataset=dataset)
        memory = compiled_memory(config, dataset)
        rows.append(summarise(name, config, workdir, memory))
    md = write_report(rows, options, base, min(len(dataset.x_test), base.test_size or 10**9))
    print(md.read_text())
    return rows


if __name__ == "__main__":
    main()
