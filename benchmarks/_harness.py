"""What every benchmark script shares: timing, compiled memory, gradient errors, the
backward pass's own reconstruction reports, result files and the command line.

Each script (`adjoints`, `precision`, `exact`, `jacobian`) imports this module and
`blocks`, never another script. Its `main` is `harness.cli(NAME, __doc__, run,
write_markdown, plot)`: `run(args)` measures and returns a JSON-able dict, the harness
adds when/where it was measured (`meta`), writes `NAME.json`, then `NAME.md` and
`NAME.png` from the JSON (so `--replot` rewrites them from a committed run).
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from tqdm.auto import tqdm

import revdeq_jax as rdeq


MiB = 2.0**20


# ---------------------------------------------------------------------------------------
# Programs.


class Batched(eqx.Module):
    """`fn(z, x)` of a whole batch: the block `jax.vmap`ped inside `fn`, so the batch is
    one solve (one state, one backward pass)."""

    block: eqx.Module

    def __call__(self, z, x):
        return jax.vmap(self.block)(z, x)


def cast_floats(tree, dtype):
    """Casts every floating array leaf of `tree` to `dtype`."""
    return jtu.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def num_params(tree) -> int:
    return int(sum(x.size for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))))


class Compiler:
    """`jax.jit(fn).lower(*args).compile()`, keeping a log of what took how long."""

    def __init__(self):
        self.log: list[dict[str, Any]] = []

    def __call__(self, what: str, fn: Callable, *args, solves: int = 1):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        self.log.append({"what": what, "solves": solves, "compile_s": time.perf_counter() - t0})
        return compiled

    @property
    def total_s(self) -> float:
        return sum(c["compile_s"] for c in self.log)


def memory_of(compiled) -> dict[str, float]:
    """`memory_analysis()` of a compiled program, in MiB (deterministic, unlike time)."""
    m = compiled.memory_analysis()
    fields = ("temp", "argument", "output", "alias", "generated_code")
    return {f"{f}_mib": getattr(m, f"{f}_size_in_bytes", 0) / MiB for f in fields}


# ---------------------------------------------------------------------------------------
# Gradients.


def to_numpy64(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jtu.tree_leaves(tree)]


def rel_error(grads: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, float]:
    """`worst_leaf`: the largest per-leaf `||g - ref|| / ||ref||`; `global`: the same over
    all leaves together. Both NaN if any leaf of `grads` is not finite."""
    per_leaf = []
    num = den = 0.0
    for g, r in zip(grads, ref, strict=True):
        if not np.all(np.isfinite(g)):
            return {"worst_leaf": math.nan, "global": math.nan}
        d = float(np.sum(np.square(g - r)))
        n = float(np.sum(np.square(r)))
        per_leaf.append(math.sqrt(d) / max(math.sqrt(n), 1e-300))
        num += d
        den += n
    return {"worst_leaf": max(per_leaf), "global": math.sqrt(num) / max(math.sqrt(den), 1e-300)}


class Reports:
    """Collects what `ReversibleAdjoint(report=...)` measures on the real backward pass.

    `adjoint(tag)` is a `ReversibleAdjoint(on_mismatch="ignore", vmap_backward="batch")`
    whose report lands under
    `tag` (one call per solve, i.e. per example under `jax.vmap`); `take(tag)` returns the
    worst over those calls and forgets them: `abs`/`rel` deviation of the rebuilt
    `(y_0, z_0)`, `drift` (exact state: largest distance of a re-evaluation of `fn` from
    the lattice point it was snapped to, in ulps of the leaf's largest binade), and how
    many solves flagged a
    mismatch. Floating states never reconstruct exactly, hence `"ignore"`: the benchmark
    records the flag instead of raising it."""

    def __init__(self):
        self._got: dict[str, list[dict[str, np.ndarray]]] = {}
        self._hooks: dict[str, Callable] = {}

    def adjoint(self, tag: str) -> rdeq.ReversibleAdjoint:
        if tag not in self._hooks:  # one hook per tag: jit caches on its identity

            def hook(report, _tag=tag):
                self._got.setdefault(_tag, []).append(jax.device_get(report))

            self._hooks[tag] = hook
        # The benchmarks' losses sum the vmapped solves before `grad`: the batch rule.
        return rdeq.ReversibleAdjoint(
            on_mismatch="ignore", report=self._hooks[tag], vmap_backward="batch"
        )

    def take(self, tag: str) -> dict[str, Any]:
        jax.effects_barrier()
        got = self._got.pop(tag, [])
        if not got:
            return {"abs": None, "rel": None, "drift": None, "mismatch": None, "solves": 0}

        def worst(k):
            v = np.concatenate([np.ravel(np.asarray(g[k], np.float64)) for g in got])
            return math.nan if not np.all(np.isfinite(v)) else float(np.max(v))

        flags = np.concatenate([np.ravel(np.asarray(g["mismatch"])) for g in got])
        return {
            "abs": worst("abs"),
            "rel": worst("rel"),
            "drift": worst("drift"),
            "mismatch": int(np.sum(flags)),
            "solves": int(flags.size),
        }

    def clear(self) -> None:
        jax.effects_barrier()
        self._got.clear()


# ---------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass(frozen=True)
class Timing:
    max_rounds: int = 9  # interleaved rounds (at most)
    min_rounds: int = 3
    round_budget_s: float = 40.0  # timing time per call of `time_interleaved`
    min_sample_s: float = 0.02  # fast calls are repeated so a sample lasts this long


QUICK_TIMING = Timing(max_rounds=3, min_rounds=2, round_budget_s=8.0, min_sample_s=0.01)


def time_interleaved(
    programs: dict[str, tuple[Callable, tuple]],
    timing: Timing,
    *,
    seed: int = 0,
    desc: str = "timing",
) -> dict[str, dict[str, Any]]:
    """Round-robin timing of `name -> (fn, args)`: every round times each program once
    (a sample of `inner` back-to-back calls, each waited for), in a fresh random order,
    so slow drifts of a shared machine hit all programs alike. Compile excluded (the
    first call is a warm-up). Ratios of medians from one call are the numbers to quote."""
    rng = np.random.default_rng(seed)
    names = list(programs)
    inner, est = {}, {}
    for name in names:  # warm up and calibrate
        fn, args = programs[name]
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        inner[name] = int(min(50, max(1, math.ceil(timing.min_sample_s / max(dt, 1e-6)))))
        est[name] = max(dt * inner[name], 1e-4)
    fit = timing.round_budget_s // sum(est.values())
    rounds = int(max(timing.min_rounds, min(timing.max_rounds, fit)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in tqdm(range(rounds), desc=desc, leave=False):
        for i in rng.permutation(len(names)):
            fn, args = programs[names[i]]
            t0 = time.perf_counter()
            for _ in range(inner[names[i]]):
                jax.block_until_ready(fn(*args))
            samples[names[i]].append((time.perf_counter() - t0) / inner[names[i]])
    out = {}
    for name in names:
        s = np.asarray(samples[name]) * 1e3
        out[name] = {
            "median_ms": float(np.median(s)),
            "q25_ms": float(np.quantile(s, 0.25)),
            "q75_ms": float(np.quantile(s, 0.75)),
            "min_ms": float(np.min(s)),
            "rounds": len(s),
            "inner": inner[name],
        }
    return out


# ---------------------------------------------------------------------------------------
# Formatting.


def fmt_err(x) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "non-finite"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def fmt(x, spec=".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def span(values, spec=".2f") -> str:
    """`lo–hi` of `values` (one number when they print the same)."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}–{hi}"


# ---------------------------------------------------------------------------------------
# Results and the command line.


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": __import__("jaxlib").__version__,
        "equinox": eqx.__version__,
        "revdeq_jax": rdeq.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def fmt_load(load) -> str:
    return "n/a" if load is None else ", ".join(f"{x:.1f}" for x in load)


def provenance(data, name: str) -> list[str]:
    """The opening lines of a results file: when, where and how it was measured."""
    m = data["meta"]
    mc = m["machine"]
    quick = data["settings"].get("quick", False)
    return [
        f"Generated by `python -m benchmarks.{name}{' --quick' if quick else ''}` on "
        f"{m['date']}; the run took {m['wall_s'] / 60:.1f} min."
        + (" **Quick run** (fewer cases and timing rounds)." if quick else ""),
        "",
        f"- Machine: {mc['cpu']}, {mc['cores']} cores, backend `{mc['backend']}`; load "
        f"average (1, 5, 15 min) at start {fmt_load(m['load_start'])}, at end "
        f"{fmt_load(m['load_end'])}. The machine is shared: compare ratios measured in the "
        "same interleaved rounds; timing differences under ~15% are noise. Compiled memory "
        "is deterministic.",
        f"- JAX {mc['jax']}, jaxlib {mc['jaxlib']}, Equinox {mc['equinox']}, revdeq_jax "
        f"{mc['revdeq_jax']}, Python {mc['python']}.",
    ]


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return x


def from_json(x):
    """Inverse of `jsonable` for the non-finite floats it writes as strings."""
    if isinstance(x, dict):
        return {k: from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_json(v) for v in x]
    if x in ("nan", "inf", "-inf"):
        return float(x)
    return x


def cli(
    name: str,
    doc: str,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    write_markdown: Callable[[dict[str, Any], Path], None],
    plot: Callable[[dict[str, Any], Path], None] | None,
    *,
    argv=None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict[str, Any]:
    """The `main` of a benchmark script: `--quick`, `--out`, `--replot` plus the script's
    own options; measures with `run(args)` (which must put `quick` into its
    `"settings"`), writes `NAME.{json,md,png}` into `--out`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--replot",
        action="store_true",
        help=f"only rewrite {name}.md and {name}.png from an existing {name}.json",
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    path = args.out / f"{name}.json"
    if not args.replot:
        args.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        meta = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(),
        }
        meta["load_start"] = meta["machine"]["loadavg"]
        data = run(args)
        meta["wall_s"] = time.perf_counter() - start
        meta["load_end"] = machine_info()["loadavg"]
        data["meta"] = {**meta, **data.get("meta", {})}
        path.write_text(json.dumps(jsonable(data), indent=1))
    data = from_json(json.loads(path.read_text()))
    write_markdown(data, args.out / f"{name}.md")
    if plot is not None:
        plot(data, args.out / f"{name}.png")
    print(f"wrote {args.out}/{name}.{{json,md{',png' if plot else ''}}}")
    return data


def choose_settings(args, full, quick):
    """`quick` or `full` settings by `--quick`, restricted to `--blocks` if given."""
    settings = quick if args.quick else full
    if getattr(args, "blocks", None):
        settings = dataclasses.replace(settings, blocks=tuple(args.blocks))
    return settings


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> list[str]:
    """A markdown table: the first `left` columns left-aligned, the others right."""
    align = ["---"] * left + ["---:"] * (len(head) - left)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def log_axes(ax, steps, *, xlabel="max_steps") -> None:
    """Log-log axes with `steps` as the x ticks (the plots' shared look)."""
    import matplotlib.ticker

    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(list(steps))
    ax.set_xticklabels([str(n) for n in steps])
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, which="both", alpha=0.3)
