"""What both experiments' comparisons (`compare.py`) share: one workdir per (model, seed)
that is skipped when finished and resumed when partial, a step plan fixed on the first
invocation, the compiled train step's memory and speed, and the two views of the results
(at matched optimiser steps and at matched wall-clock).

```python
plan = load_plan(runs / "plan.json", budget_min, lambda: {"train_steps": 300, ...})
for name, seed in ...:
    workdir = runs / f"{name}-seed{seed}"
    if run_status(workdir) != "done":
        train(config, workdir, resume=run_status(workdir) == "partial")
```
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from .run import CONFIG_FILE


RunStatus = Literal["done", "partial", "new"]
PLAN_FILE = "plan.json"
# Share of the comparison's budget kept for what is not a train step: compiling (train and
# eval steps), validation, the final test and the NFE sweep. Ours, from the language `repro`
# measurements (compile ~20 s and evaluation ~40 s a run against ~5 min of training).
OVERHEAD_FRACTION = 0.25


class ReproduceError(RuntimeError):
    """A comparison directory that cannot be continued as asked; says what to do."""


def run_status(workdir: pathlib.Path) -> RunStatus:
    """`"done"` (it wrote `results.json`), `"partial"` (started: it has a `config.json`,
    so `--resume` continues it), or `"new"`."""
    if (workdir / "results.json").is_file():
        return "done"
    return "partial" if (workdir / CONFIG_FILE).is_file() else "new"


def load_plan(path: pathlib.Path, budget_min: float, make: Callable[[], dict]) -> dict:
    """The plan in `path` if there is one (a resumed comparison keeps its step count), else
    `make()` written there. **Raises:** `ReproduceError` when the saved plan was made for
    another budget (the finished runs would not match the new one)."""
    if path.is_file():
        plan = json.loads(path.read_text())
        if not math.isclose(plan["budget_min"], budget_min):
            raise ReproduceError(
                f"{path} was planned for a {plan['budget_min']:g}-minute budget, not "
                f"{budget_min:g}; give --budget_min={plan['budget_min']:g} to continue it, "
                "or a new --runs directory to start another comparison"
            )
        print(f"continuing the plan in {path}: {plan['train_steps']} steps per run")
        return plan
    plan = {"budget_min": budget_min, **make()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def steps_for_budget(
    budget_min: float, seconds_per_step: Iterable[float], seeds: int, *, minimum: int = 10
) -> int:
    """Optimiser steps per run such that every model (`seconds_per_step` each) trained
    `seeds` times fills `budget_min` minutes, `OVERHEAD_FRACTION` of it kept for the rest."""
    per_step = seeds * sum(seconds_per_step)
    return max(minimum, int((1 - OVERHEAD_FRACTION) * 60 * budget_min / per_step))


def profile_step(
    step: Any, state: Any, batch: Callable[[int], Any], *, steps: int = 3
) -> dict[str, float | int]:
    """Compile `step(state, batch(i), key)` (an `eqx.filter_jit` function) and time it:
    `compile_s`, `seconds_per_step` (after one warm-up call, over `steps` calls on real
    batches) and XLA's compile-time memory of the step, `peak_bytes` (arguments + outputs +
    temporaries - aliased) and `temp_bytes` (when the backend reports them)."""
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch(0), key).compile()  # equinox's wrapper of jax's
    compile_s = time.perf_counter() - t0
    out: dict[str, float | int] = {"compile_s": compile_s}
    try:
        memory = compiled.compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - some backends have no memory analysis
        print(f"memory_analysis unavailable: {type(e).__name__}: {e}")
        memory = None
    if memory is not None:
        out["temp_bytes"] = int(memory.temp_size_in_bytes)
        out["peak_bytes"] = int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
    state, metrics = compiled(state, batch(0), key)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        state, metrics = compiled(state, batch(i), jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    out["seconds_per_step"] = (time.perf_counter() - t0) / steps
    return out


def training_seconds(records: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Cumulative training wall-clock at each logged step, from the train records'
    `ms_per_step` (steps before the first measurement, i.e. compilation, are charged at the
    first measured rate). Evaluation and checkpointing are not counted."""
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


def val_curve(records: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float, float]]:
    """`(step, training seconds, value of key)` of every validation record. A validation
    between two logged train steps gets the time interpolated between theirs (the vision
    runs validate every 24 steps and log every 10: looking the step up gave NaN, which left
    the matched-time view and the wall-clock curves without the intermediate points)."""
    seconds = training_seconds(records)
    steps = sorted(seconds)
    val = sorted((r for r in records if r["split"] == "val"), key=lambda r: r["step"])
    out = []
    for r in val:
        step = r["step"]
        if step in seconds:
            t = seconds[step]
        elif len(steps) > 1 and steps[0] < step < steps[-1]:
            t = float(np.interp(step, steps, [seconds[s] for s in steps]))
        else:
            t = math.nan  # after the last logged step: unknown
        out.append((step, t, r[key]))
    return out


def at_time(
    curve: Sequence[Sequence[float]], seconds: float, better: Callable[..., float]
) -> tuple[int, float] | None:
    """`(step, best value)` among the evaluations of `curve` (rows `(step, seconds, value)`)
    made within `seconds` of training, `better` being `min` or `max`; `None` if none was."""
    within = [(step, value) for step, t, value in curve if t <= seconds * (1 + 1e-9)]
    if not within:
        return None
    value = better(v for _, v in within)
    return max(step for step, _ in within), value


def matched_seconds(runs_per_model: Iterable[Sequence[Mapping[str, Any]]]) -> float:
    """The wall-clock of the matched-time view: the fastest model's mean training time, or,
    if that comes before some run's first validation, that validation's time, so that every
    run has a value. (A model much faster than the rest, like a small ResNet against
    implicit models, otherwise leaves the view empty; with the later time its whole run
    lies within the window, and the slower models are still caught mid-run.)

    `runs_per_model`: for each model its runs, each with `train_seconds` and `curve` (rows
    `(step, seconds, value)` as from `val_curve`)."""
    models = [list(runs) for runs in runs_per_model]
    fastest = min(statistics.fmean(run["train_seconds"] for run in runs) for runs in models)
    firsts = [
        min((t for _, t, _ in run["curve"] if math.isfinite(t)), default=math.nan)
        for runs in models
        for run in runs
    ]
    first_val = max((t for t in firsts if math.isfinite(t)), default=0.0)
    return max(fastest, first_val)


def spread(values: Sequence[float | None]) -> dict[str, float] | None:
    """Mean, min, max and count over seeds (`None`s dropped; `None` if nothing is left)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fmt_spread(s: dict[str, float] | None, spec: str, scale: float = 1.0) -> str:
    """`mean (min-max)` over seeds, or `mean` for one seed, or `-`."""
    if s is None:
        return "-"
    mean = format(scale * s["mean"], spec)
    if s["n"] < 2:
        return mean
    return f"{mean} ({format(scale * s['min'], spec)}–{format(scale * s['max'], spec)})"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: int = 1) -> str:
    """A GitHub table; columns from `right` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"
