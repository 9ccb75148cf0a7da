"""Precision study of the reversible solver's state: which state keeps the reversible
gradient exact, at what depth, and what it costs.

    python -m benchmarks.precision [--quick] [--out benchmarks/results]

`Reversible(beta, state_dtype=S)` with `ReversibleAdjoint()` rebuilds the forward
trajectory backwards, and every inverse step divides by `1 - beta`, so rounding errors
are amplified about `1/|1 - beta|` times per step. For the attention and the conv
blocks of `benchmarks/blocks.py` (the library's `nn.EquilibriumTransformerLayer` and
`nn.ConvResidualLayer`; one solve of a small batch, `fn` the block `jax.vmap`ped over
the batch), each `beta`, each number of steps (`tol=0`: every solve takes exactly
`max_steps` steps), each state option

* `float32`: `FloatState(jnp.float32)` (for a float32 `fn` the same as `None`),
* `float32x2`: `TwoFloatState()`, about 48 bits, no 64-bit types,
* `float64`: `FloatState(jnp.float64)`, 64-bit switched on only around the solver,
* `exact`: `ExactState()`, fixed-point int64 plus an information buffer, `fn`'s output
  rounded to a lattice with 6 guard bits (refined by the packing's spare bits), so the
  backward pass snaps re-evaluations within 31.5 ulps back onto the forward's value,
* `exact-nolattice`: `ExactState(guard_bits=0)`, the previous exact state: exact only
  if the backward pass re-evaluates `fn` to the same bits,

and each dtype of `fn` (float32, bfloat16: block, input and `z0` cast), it measures

* from the backward pass itself (`ReversibleAdjoint(report=...)`, `on_mismatch=
  "ignore"`): the deviation of the rebuilt initial state, its mismatch flag, and the
  exact state's drift (how far re-evaluations landed from the lattice point they were
  snapped to, in ulps of the leaf's largest binade);
* the gradient error: the largest over the leaves (every block parameter and the input)
  of `||g - g_ref|| / ||g_ref||`, for the loss `sum(sin(value))`, against the gradient of
  the same solve unrolled in float64 (`UnrolledAdjoint`, block, input and `z0` cast to
  float64 under `jax.enable_x64(True)`); for a bfloat16 `fn` also against the unrolled
  gradient of the same bfloat16 computation with the same floating state;
* the median time of one jitted value-and-grad step at a few step counts, timed
  interleaved, its ratio to the float32 state measured in the same rounds, and compiled
  temp memory;

plus **per-example `jax.vmap` rows**: each example of the batch solved on its own under
`jax.vmap` (the setting where the previous exact state lost exactness), for `exact`,
`exact-nolattice` and `float64`, fn float32.

Writes `precision.{md,json,png}` into `--out`; `--replot` rewrites the md and png from
the JSON. `--quick`: one `beta`, three step counts, fewer timing rounds. Most of the run
time is compiling.
"""

import dataclasses
import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import revdeq_jax as rdeq

from . import _harness as h, blocks as blocks_lib


# name -> `state_dtype` of `Reversible`
STATES: dict[str, Any] = {
    "float32": rdeq.FloatState(jnp.float32),
    "float32x2": rdeq.TwoFloatState(),
    "float64": rdeq.FloatState(jnp.float64),
    "exact": rdeq.ExactState(),
    "exact-nolattice": rdeq.ExactState(guard_bits=0),
}
EXACT_STATES = ("exact", "exact-nolattice")
# States with a floating unrolled counterpart of the very same computation.
SAME_REF_STATES = ("float32", "float64")
FN_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Settings:
    blocks: tuple[str, ...] = ("attention", "conv")
    betas: tuple[float, ...] = (0.5, 0.8, 0.9)
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    states: tuple[str, ...] = tuple(STATES)
    fn_dtypes: tuple[str, ...] = tuple(FN_DTYPES)
    batch: int = 4
    # Step counts whose gradient programs are compiled one per state (for time and
    # memory); the others are compiled together, one program per (block, fn, beta).
    timing_steps: tuple[int, ...] = (16, 64)
    timing_betas: tuple[float, ...] = (0.9,)  # timed (memory is recorded for every beta)
    same_refs_for: tuple[str, ...] = ("bfloat16",)
    timing: h.Timing = h.Timing(max_rounds=7, round_budget_s=45.0)
    # Per-example vmap rows (fn float32): one program per (block, beta, steps, state).
    vmap_blocks: tuple[str, ...] = ("attention", "conv", "attention-small", "mlp")
    vmap_betas: tuple[float, ...] = (0.8, 0.9)
    vmap_steps: tuple[int, ...] = (16, 64)
    vmap_states: tuple[str, ...] = ("exact", "exact-nolattice", "float64")
    # Side measurement: the same gradient errors from a random `z0` (fn float32).
    side_block: str = "conv"
    side_beta: float = 0.8
    side_steps: tuple[int, ...] = (1, 4, 16)
    seed: int = 0


QUICK = Settings(
    betas=(0.8,),
    steps=(1, 4, 16),
    timing_steps=(16,),
    timing_betas=(0.8,),
    timing=h.QUICK_TIMING,
    side_steps=(1, 4),
)


# ---------------------------------------------------------------------------------------
# The programs that are measured.


def make_value_and_grad(
    static, state, beta: float, steps: int, adjoint, z0=None, *, per_example: bool = False
):
    """`(params, xs) -> (loss, (params_grad, xs_grad))` with `loss = sum(sin(value))`,
    from `z0` (default zeros; an array is cast to the dtype of `xs`). One solve of the
    whole batch (`fn` the block `vmap`ped over it), or with `per_example=True` one solve
    per example under `jax.vmap`."""
    solver = rdeq.Reversible(beta, state_dtype=state)

    def solve(fn, init, x):
        return rdeq.fixed_point(
            fn, init, x, solver=solver, adjoint=adjoint, max_steps=steps, tol=0.0
        ).value

    def loss(params, xs):
        block = eqx.combine(params, static)
        init = jnp.zeros_like(xs) if z0 is None else z0.astype(xs.dtype)
        if per_example:
            value = jax.vmap(lambda i, x: solve(block, i, x))(init, xs)
        else:
            value = solve(h.Batched(block), init, xs)
        return jnp.sum(jnp.sin(value.astype(jnp.promote_types(value.dtype, jnp.float32))))

    return jax.value_and_grad(loss, argnums=(0, 1))


def unrolled_grads(static, state, beta: float, steps, z0=None, *, per_example=False):
    """One program: the unrolled gradient at every step count in `steps`."""

    def run(p, x):
        return [
            make_value_and_grad(
                static, state, beta, n, rdeq.UnrolledAdjoint(), z0, per_example=per_example
            )(p, x)
            for n in steps
        ]

    return run


def reversible_grads(static, beta: float, steps, states, reports, tag: str, z0=None):
    """One program: the reversible gradient of every state at every step count, each
    solve reporting under `f"{tag}/{state}/{n}"`."""

    def run(p, x):
        return {
            s: [
                make_value_and_grad(
                    static, STATES[s], beta, n, reports.adjoint(f"{tag}/{s}/{n}"), z0
                )(p, x)
                for n in steps
            ]
            for s in states
        }

    return run


def float64_reference(compiler, block, xs, beta, steps, z0=None, *, per_example=False):
    """The float64 unrolled gradients (block, input, `z0` and state in float64)."""
    with jax.enable_x64(True):
        params, static = eqx.partition(h.cast_floats(block, jnp.float64), eqx.is_inexact_array)
        x64 = xs.astype(jnp.float64)
        prog = compiler(
            f"float64 reference, β={beta}{', per example' if per_example else ''}",
            unrolled_grads(static, None, beta, steps, z0, per_example=per_example),
            params,
            x64,
            solves=len(steps),
        )
        return [h.to_numpy64(g) for _, g in prog(params, x64)]


def grad_row(out, ref, report) -> dict[str, Any]:
    loss, grads = out
    err = h.rel_error(h.to_numpy64(grads), ref)
    return {
        "loss": float(loss),
        "grad_err": err["worst_leaf"],
        "grad_err_global": err["global"],
        "recon_abs": report["abs"],
        "recon_rel": report["rel"],
        "drift": report["drift"],
        "mismatch": report["mismatch"],
        "solves": report["solves"],
    }


# ---------------------------------------------------------------------------------------
# One block.


def separate_steps(settings: Settings, beta: float) -> tuple[int, ...]:
    """Step counts whose gradient programs are compiled one per state at this `beta`: the
    timed ones at the timing betas, and the memory step count at every beta."""
    timed = settings.timing_steps if beta in settings.timing_betas else ()
    mem = (max(settings.timing_steps),) if settings.timing_steps else ()
    return tuple(n for n in settings.steps if n in timed or n in mem)


def run_block(name: str, settings: Settings, key, bar) -> dict[str, Any]:
    block_start = time.perf_counter()
    description, _, shape = blocks_lib.BLOCKS[name]
    block32, xs32, _ = blocks_lib.make(name, settings.batch, key=key)
    steps, states = settings.steps, settings.states
    compiler = h.Compiler()
    reports = h.Reports()
    rows: list[dict[str, Any]] = []

    for fn_name in settings.fn_dtypes:
        dtype = FN_DTYPES[fn_name]
        block = h.cast_floats(block32, dtype)
        xs = xs32.astype(dtype)
        params, static = eqx.partition(block, eqx.is_inexact_array)
        programs: dict[str, tuple[Any, tuple]] = {}
        for beta in settings.betas:
            tag = f"{name}/{fn_name}/{beta}"
            bar.set_postfix_str(f"{tag}: float64 unrolled reference")
            refs = float64_reference(compiler, block, xs, beta, steps)
            bar.update()

            same = {}
            same_states = [s for s in SAME_REF_STATES if s in states]
            if fn_name in settings.same_refs_for and same_states:
                bar.set_postfix_str(f"{tag}: same-precision unrolled references")
                for s in same_states:
                    prog = compiler(
                        f"{fn_name} same-precision reference, β={beta}, {s}",
                        unrolled_grads(static, STATES[s], beta, steps),
                        params,
                        xs,
                        solves=len(steps),
                    )
                    same[s] = [h.to_numpy64(g) for _, g in prog(params, xs)]
                bar.update()

            outs: dict[tuple[str, int], Any] = {}
            memory: dict[tuple[str, int], dict[str, float]] = {}
            alone = separate_steps(settings, beta)
            bundled = tuple(n for n in steps if n not in alone)
            if bundled:
                bar.set_postfix_str(f"{tag}: reversible gradients at {len(bundled)} step counts")
                prog = compiler(
                    f"{fn_name} reversible gradients, β={beta}, steps {bundled}",
                    reversible_grads(static, beta, bundled, states, reports, tag),
                    params,
                    xs,
                    solves=len(bundled) * len(states),
                )
                for s, per_n in prog(params, xs).items():
                    for n, out in zip(bundled, per_n):
                        outs[(s, n)] = out
                bar.update()
            for n in alone:
                for s in states:
                    bar.set_postfix_str(f"{tag}: reversible gradient, {s}, {n} steps")
                    adjoint = reports.adjoint(f"{tag}/{s}/{n}")
                    compiled = compiler(
                        f"{fn_name} reversible gradient, β={beta}, {s}, {n} steps",
                        make_value_and_grad(static, STATES[s], beta, n, adjoint),
                        params,
                        xs,
                    )
                    outs[(s, n)] = compiled(params, xs)
                    memory[(s, n)] = h.memory_of(compiled)
                    if beta in settings.timing_betas and n in settings.timing_steps:
                        programs[f"{s}/{beta}/{n}"] = (compiled, (params, xs))
                    bar.update()

            for s in states:
                for i, n in enumerate(steps):
                    row = {"fn_dtype": fn_name, "beta": beta, "state": s, "steps": n}
                    row |= grad_row(outs[(s, n)], refs[i], reports.take(f"{tag}/{s}/{n}"))
                    row["grad_err_same"] = row["grad_err_same_global"] = None
                    if s in same:
                        e = h.rel_error(h.to_numpy64(outs[(s, n)][1]), same[s][i])
                        row["grad_err_same"], row["grad_err_same_global"] = (
                            e["worst_leaf"],
                            e["global"],
                        )
                    if (s, n) in memory:
                        row["memory"] = memory[(s, n)]
                        base = memory.get(("float32", n))
                        row["temp_ratio"] = (
                            row["memory"]["temp_mib"] / base["temp_mib"] if base else math.nan
                        )
                    rows.append(row)

        if programs:
            bar.set_postfix_str(f"{name}, {fn_name}: timing")
            t = h.time_interleaved(programs, settings.timing, desc=f"timing {name} {fn_name}")
            reports.clear()  # the timed calls reported too
            for row in rows:
                key_ = f"{row['state']}/{row['beta']}/{row['steps']}"
                if row["fn_dtype"] == fn_name and key_ in t:
                    row["time"] = t[key_]
                    base = t.get(f"float32/{row['beta']}/{row['steps']}")
                    row["time_ratio"] = (
                        row["time"]["median_ms"] / base["median_ms"] if base else math.nan
                    )
            bar.update()
        del programs

    return {
        "description": description,
        "example_shape": list(shape),
        "batch": settings.batch,
        "state_elements": settings.batch * math.prod(shape),
        "num_params": h.num_params(block32),
        "rows": rows,
        "compiles": compiler.log,
        "compile_s": compiler.total_s,
        "wall_s": time.perf_counter() - block_start,
    }


def per_example_rows(name, settings: Settings, key, bar) -> dict[str, Any]:
    """Each example solved on its own under `jax.vmap` (fn float32): one program per
    (beta, steps, state), as a user's vmapped train step would be."""
    start = time.perf_counter()
    description, _, shape = blocks_lib.BLOCKS[name]
    block, xs, _ = blocks_lib.make(name, settings.batch, key=key)
    compiler = h.Compiler()
    reports = h.Reports()
    params, static = eqx.partition(block, eqx.is_inexact_array)
    steps = settings.vmap_steps
    rows = []
    for beta in settings.vmap_betas:
        tag = f"{name}/vmap/{beta}"
        bar.set_postfix_str(f"{tag}: float64 unrolled reference")
        refs = float64_reference(compiler, block, xs, beta, steps, per_example=True)
        bar.update()
        for i, n in enumerate(steps):
            for s in settings.vmap_states:
                bar.set_postfix_str(f"{tag}: {s}, {n} steps")
                adjoint = reports.adjoint(f"{tag}/{s}/{n}")
                compiled = compiler(
                    f"per-example vmap, β={beta}, {s}, {n} steps",
                    make_value_and_grad(static, STATES[s], beta, n, adjoint, per_example=True),
                    params,
                    xs,
                )
                row = {"beta": beta, "state": s, "steps": n}
                row |= grad_row(compiled(params, xs), refs[i], reports.take(f"{tag}/{s}/{n}"))
                row["memory"] = h.memory_of(compiled)
                rows.append(row)
                bar.update()
    return {
        "description": description,
        "example_shape": list(shape),
        "num_params": h.num_params(block),
        "rows": rows,
        "compile_s": compiler.total_s,
        "wall_s": time.perf_counter() - start,
    }


def side_random_z0(settings: Settings, key, bar) -> dict[str, Any] | None:
    """The conv block at `z0 = 0` sits exactly on ReLU kinks (the GroupNorm of the
    all-zero `W1 * z0` is exactly 0), so a reconstruction of `z0` that is off by any
    amount flips `relu'` there. The same measurement from a random `z0 = 0.1 N(0, 1)`
    separates that from the amplification of rounding errors."""
    if not settings.side_steps or settings.side_block not in settings.blocks:
        return None
    start = time.perf_counter()
    name, beta, steps = settings.side_block, settings.side_beta, settings.side_steps
    kb, kz = key
    block, xs, _ = blocks_lib.make(name, settings.batch, key=kb)
    params, static = eqx.partition(block, eqx.is_inexact_array)
    z0 = 0.1 * jax.random.normal(kz, xs.shape, xs.dtype)
    compiler = h.Compiler()
    reports = h.Reports()
    bar.set_postfix_str(f"side: {name}, random z0, float64 reference")
    refs = float64_reference(compiler, block, xs, beta, steps, z0)
    bar.update()
    bar.set_postfix_str(f"side: {name}, random z0, reversible gradients")
    prog = compiler(
        "side: reversible gradients",
        reversible_grads(static, beta, steps, settings.states, reports, "side", z0),
        params,
        xs,
        solves=len(steps) * len(settings.states),
    )
    rows = []
    for s, outs in prog(params, xs).items():
        for n, out, ref in zip(steps, outs, refs):
            rows.append(
                {"state": s, "steps": n, **grad_row(out, ref, reports.take(f"side/{s}/{n}"))}
            )
    bar.update()
    return {
        "block": name,
        "fn_dtype": "float32",
        "beta": beta,
        "steps": list(steps),
        "z0": "0.1 * N(0, 1)",
        "rows": rows,
        "compiles": compiler.log,
        "compile_s": compiler.total_s,
        "wall_s": time.perf_counter() - start,
    }


def count_tasks(settings: Settings) -> int:
    """Progress-bar units of the whole run."""
    per_block = 0
    for beta in settings.betas:
        alone = separate_steps(settings, beta)
        per_fn = 1 + (1 if any(n not in alone for n in settings.steps) else 0)
        per_fn += len(settings.states) * len(alone)
        same = sum(f in settings.same_refs_for for f in settings.fn_dtypes)
        per_block += same + per_fn * len(settings.fn_dtypes)
    if set(settings.timing_betas) & set(settings.betas):
        per_block += len(settings.fn_dtypes)
    vmap = len(settings.vmap_betas) * (1 + len(settings.vmap_steps) * len(settings.vmap_states))
    total = per_block * len(settings.blocks)
    total += vmap * len(settings.vmap_blocks)
    return total + (2 if settings.side_steps and settings.side_block in settings.blocks else 0)


def run(args) -> dict[str, Any]:
    settings = h.choose_settings(args, Settings(), QUICK)
    if args.betas:
        settings = dataclasses.replace(
            settings,
            betas=tuple(args.betas),
            timing_betas=tuple(b for b in settings.timing_betas if b in args.betas)
            or (args.betas[-1],),
        )
    if args.steps:
        settings = dataclasses.replace(
            settings,
            steps=tuple(sorted(args.steps)),
            timing_steps=tuple(n for n in settings.timing_steps if n in args.steps)
            or (max(args.steps),),
        )
    keys = jax.random.split(jax.random.key(settings.seed), len(settings.blocks))
    results = {}
    with tqdm(total=count_tasks(settings), desc="precision") as bar:
        for name, key in zip(settings.blocks, keys):
            results[name] = run_block(name, settings, key, bar)
        vmap = {}
        for i, name in enumerate(settings.vmap_blocks):
            # the main grid's block where there is one
            kb = (
                keys[settings.blocks.index(name)]
                if name in settings.blocks
                else jax.random.fold_in(jax.random.key(settings.seed), 2 + i)
            )
            vmap[name] = per_example_rows(name, settings, kb, bar)
        side = None
        if settings.side_block in settings.blocks:
            kb = keys[settings.blocks.index(settings.side_block)]  # the main grid's block
            kz = jax.random.fold_in(jax.random.key(settings.seed), 1)
            side = side_random_z0(settings, (kb, kz), bar)
    compile_s = sum(b["compile_s"] for b in [*results.values(), *vmap.values()])
    compile_s += side["compile_s"] if side else 0
    return {
        "meta": {"compile_s": compile_s},
        "settings": {**dataclasses.asdict(settings), "quick": args.quick},
        "state_buffer_bits_per_step": {
            s: {str(b): STATES[s].buffer_bits_per_step(b) for b in settings.betas}
            for s in EXACT_STATES
        },
        "exact_tolerance_ulps": {s: STATES[s].tolerance_ulps() for s in EXACT_STATES},
        "blocks": results,
        "vmap": vmap,
        "side_random_z0": side,
    }


# ---------------------------------------------------------------------------------------
# Reporting.


def lookup(blk) -> dict[tuple, dict[str, Any]]:
    return {(r["fn_dtype"], r["beta"], r["state"], r["steps"]): r for r in blk["rows"]}


def fmt_report(row) -> str:
    """The backward pass's own verdict: rebuilt-`z0` deviation, and ✗ where it flagged
    a mismatch (`k/n` solves when only some of them did)."""
    if row["solves"] == 0:
        return "n/a"
    cell = h.fmt_err(row["recon_rel"])
    if row["mismatch"]:
        cell += " ✗" if row["mismatch"] == row["solves"] else f" ✗{row['mismatch']}/{row['solves']}"
    return cell


def error_table(blk, s, fn, betas, field: str, *, same_rows: bool = False) -> list[str]:
    """Rows = (beta, state), columns = steps."""
    idx = lookup(blk)
    steps = s["steps"]
    cell = fmt_report if field == "report" else (lambda r: h.fmt_err(r[field]))
    out = [
        "| β | state | " + " | ".join(str(n) for n in steps) + " |",
        "|---|---|" + "---:|" * len(steps),
    ]
    for beta in betas:
        for st in s["states"]:
            out.append(
                f"| {beta} | {st} | "
                + " | ".join(cell(idx[(fn, beta, st, n)]) for n in steps)
                + " |"
            )
        if same_rows:
            for st in s["states"]:
                vals = [idx[(fn, beta, st, n)]["grad_err_same"] for n in steps]
                if all(v is None for v in vals):
                    continue
                out.append(
                    f"| {beta} | {st}, vs same-precision unrolled | "
                    + " | ".join(h.fmt_err(v) for v in vals)
                    + " |"
                )
    return out


def drift_table(blk, s, betas) -> list[str]:
    """The exact state's drift (largest distance of a re-evaluation from the lattice point
    it was snapped to, in lattice units), fn float32 and bfloat16."""
    idx = lookup(blk)
    steps = s["steps"]
    out = [
        "| fn | β | " + " | ".join(str(n) for n in steps) + " |",
        "|---|---|" + "---:|" * len(steps),
    ]
    for fn in s["fn_dtypes"]:
        for beta in betas:
            vals = [idx[(fn, beta, "exact", n)]["drift"] for n in steps]
            out.append(f"| {fn} | {beta} | " + " | ".join(h.fmt(v, ".3g") for v in vals) + " |")
    return out


def cost_table(blk, s, fn) -> list[str]:
    idx = lookup(blk)
    tsteps = [n for n in s["steps"] if n in s["timing_steps"]]
    tbetas = [b for b in s["timing_betas"] if b in s["betas"]]
    head, sep = "| state |", "|---|"
    for b in tbetas:
        for n in tsteps:
            head += f" ms, β={b}, {n} steps | × float32 |"
            sep += "---:|---:|"
    mem_n = max(tsteps)
    for b in s["betas"]:
        head += f" MiB, β={b}, {mem_n} steps | × float32 |"
        sep += "---:|---:|"
    out = [head, sep]
    for st in s["states"]:
        line = f"| {st} |"
        for b in tbetas:
            for n in tsteps:
                r = idx[(fn, b, st, n)]
                line += f" {r['time']['median_ms']:.1f} | {h.fmt(r['time_ratio'], '.2f')} |"
        for b in s["betas"]:
            r = idx[(fn, b, st, mem_n)]
            line += f" {r['memory']['temp_mib']:.2f} | {h.fmt(r['temp_ratio'], '.2f')} |"
        out.append(line)
    return out


def headline_table(data, betas, n: int) -> list[str]:
    s = data["settings"]
    out = [
        "| block | fn | β | " + " | ".join(s["states"]) + " |",
        "|---|---|---|" + "---:|" * len(s["states"]),
    ]
    for name, blk in data["blocks"].items():
        idx = lookup(blk)
        for fn in s["fn_dtypes"]:
            for b in betas:
                vals = [idx[(fn, b, st, n)]["grad_err"] for st in s["states"]]
                out.append(
                    f"| {name} | {fn} | {b} | " + " | ".join(h.fmt_err(v) for v in vals) + " |"
                )
    return out


def vmap_table(data) -> list[str]:
    s = data["settings"]
    states = s["vmap_states"]
    out = [
        "| block | β | steps | "
        + " | ".join(f"{st}: grad err | {st}: backward report" for st in states)
        + " |",
        "|---|---|---:|" + "---:|---:|" * len(states),
    ]
    for name, blk in data.get("vmap", {}).items():
        idx = {(r["beta"], r["state"], r["steps"]): r for r in blk["rows"]}
        for b in s["vmap_betas"]:
            for n in s["vmap_steps"]:
                cells = []
                for st in states:
                    r = idx.get((b, st, n))
                    cells += ["–", "–"] if r is None else [h.fmt_err(r["grad_err"]), fmt_report(r)]
                if any(c != "–" for c in cells):
                    out.append(f"| {name} | {b} | {n} | " + " | ".join(cells) + " |")
    return out


def side_table(data) -> list[str]:
    side = data["side_random_z0"]
    idx = lookup(data["blocks"][side["block"]])
    sidx = {(r["state"], r["steps"]): r for r in side["rows"]}
    steps = side["steps"]
    out = [
        "| state | z0 | " + " | ".join(str(n) for n in steps) + " |",
        "|---|---|" + "---:|" * len(steps),
    ]
    for st in data["settings"]["states"]:
        main = [idx.get((side["fn_dtype"], side["beta"], st, n)) for n in steps]
        if any(m is not None for m in main):
            out.append(
                f"| {st} | 0 (main grid) | "
                + " | ".join("–" if m is None else h.fmt_err(m["grad_err"]) for m in main)
                + " |"
            )
        out.append(
            f"| {st} | {side['z0']} | "
            + " | ".join(h.fmt_err(sidx[(st, n)]["grad_err"]) for n in steps)
            + " |"
        )
    return out


NOTES = """Reading the tables:

- **grad err** is the worst leaf's `‖g − g_ref‖/‖g_ref‖` over every block parameter and
  the input (the JSON also has the error over all leaves together, `grad_err_global`),
  g_ref the float64 unrolled gradient of the same model: `UnrolledAdjoint`, block, input,
  `z0` and state in float64 under `jax.enable_x64(True)`. For a bfloat16 `fn` the
  reference is built from the bfloat16-rounded parameters and input cast to float64, so it
  measures the error of the computation, not of quantising the model; the bfloat16
  rounding of `fn` itself still sets a floor (~1e-2 and up) that no state can remove. The
  rows "vs same-precision unrolled" compare instead with `UnrolledAdjoint` differentiating
  the very same bfloat16 computation with the same floating state: the part of the error
  that reversal adds (`float32x2` and the exact states have no floating unrolled
  counterpart).
- **non-finite**: the reversed trajectory overflowed, so the gradient holds inf/NaN.
- **backward report** is what `ReversibleAdjoint(report=...)` measured on the very
  backward pass that produced the gradient: the relative deviation of the rebuilt initial
  state from the true one (over `max(max|z0|, 1)`; here `z0 = 0`, so absolute), and ✗
  where the pass flagged a mismatch (with the default `on_mismatch="raise"` that gradient
  would have been refused). The exact states flag any deviation at all; floating states
  never reconstruct exactly and flag a relative deviation above 1e-3.
- `exact` rounds `fn`'s output to a lattice (1/4 ulp of the leaf's largest binade at
  β 0.5 and 0.9, 1/8 at β 0.8: one ulp, refined by the guard bits the buffer's packing
  leaves unused) and keeps 6 guard bits (7, 8, 7 after refinement) per evaluation, so the
  backward pass snaps each re-evaluation back onto the forward's value if it lies within
  31.5 ulps (31.75–31.875 after refinement); **drift** is how far the re-evaluations
  landed from the lattice point they were snapped to, in ulps of the leaf's largest binade
  (at most half the lattice spacing for a bit-identical re-evaluation, since the forward
  rounded to the nearest point; 31.5 and above is beyond the guarantee, and the
  measurement saturates near 32). `exact-nolattice` (`guard_bits=0`, the
  previous design) needs bit-identical re-evaluations. Where reversal is exact, what
  remains against the float64 reference is the rounding of `fn` (and, for `exact`, of
  the lattice).
- Times are medians of interleaved rounds on a shared machine (the timed programs include
  the report callback, a few tens of µs); ratios are measured within one run and
  differences under ~15% are noise. Memory is the compiled `temp_size_in_bytes`.
"""


HELD = 2.0  # "as good as exact": within this factor of its gradient error


def held_depth(idx, fn, beta, state, steps) -> int:
    """The deepest step count up to which (every measured count included) the gradient
    error of `state` stays within `HELD`x that of `exact`; 0 if not even the first."""
    depth = 0
    for m in steps:
        e = idx[(fn, beta, state, m)]["grad_err"]
        ref = idx[(fn, beta, "exact", m)]["grad_err"]
        if not (math.isfinite(e) and e <= HELD * max(ref, 1e-300)):
            break
        depth = m
    return depth


def worst(rows, field="grad_err") -> float:
    vals = [r[field] for r in rows]
    return math.inf if any(not math.isfinite(v) for v in vals) else max(vals, default=math.nan)


def summary(data) -> list[str]:
    """'What this shows', from the numbers."""
    s = data["settings"]
    out = []
    # The per-example vmap rows: the case the lattice was built for.
    vrows = [r for blk in data.get("vmap", {}).values() for r in blk["rows"]]
    if vrows:
        parts = []
        for st in s["vmap_states"]:
            rs = [r for r in vrows if r["state"] == st]
            flagged = sum(r["mismatch"] > 0 for r in rs)
            parts.append(
                f"`{st}` worst gradient error {h.fmt_err(worst(rs))}, mismatch flagged in "
                f"{flagged} of {len(rs)} configurations"
            )
        out += [
            f"- **Per-example `jax.vmap`** ({', '.join(data['vmap'])}, β "
            f"{', '.join(map(str, s['vmap_betas']))}, {', '.join(map(str, s['vmap_steps']))}"
            " steps): " + "; ".join(parts) + ".",
        ]
    # The main grid's exact states.
    for st in EXACT_STATES:
        if st not in s["states"]:
            continue
        for fn in s["fn_dtypes"]:
            rs = [
                r
                for blk in data["blocks"].values()
                for r in blk["rows"]
                if r["state"] == st and r["fn_dtype"] == fn
            ]
            flagged = [r for r in rs if r["mismatch"]]
            drift = max((r["drift"] for r in rs if r["drift"] is not None), default=None)
            text = (
                f"- `{st}`, fn {fn}, one solve per batch, every β and depth: worst gradient "
                f"error {h.fmt_err(worst(rs))}; backward pass flagged a mismatch in "
                f"{len(flagged)} of {len(rs)} configurations"
            )
            if flagged:
                text += (
                    " ("
                    + ", ".join(f"{r['beta']}/{r['steps']}" for r in flagged[:6])
                    + (", …" if len(flagged) > 6 else "")
                    + " as β/steps)"
                )
            if st == "exact" and drift is not None:
                text += f"; largest drift {drift:.3g} ulps"
            out.append(text + ".")
    mem_n = max((n for n in s["steps"] if n in s["timing_steps"]), default=None)
    timed = [r for blk in data["blocks"].values() for r in blk["rows"] if "time_ratio" in r]
    for st in s["states"]:
        if st == "float32":
            continue
        t = [r["time_ratio"] for r in timed if r["state"] == st]
        parts = [f"time ×{h.span(t)}"] if t else []
        for b in s["betas"]:
            m = [
                r["temp_ratio"]
                for blk in data["blocks"].values()
                for r in blk["rows"]
                if r["state"] == st and r["beta"] == b and r["steps"] == mem_n and "temp_ratio" in r
            ]
            if m:
                parts.append(f"memory at β={b} ×{h.span(m)}")
        if parts:
            out.append(f"- Cost of `{st}` against the float32 state: " + ", ".join(parts) + ".")
    bits = data.get("state_buffer_bits_per_step", {})
    if bits:
        out.append(
            "- Information buffer, bits per state element per step (β "
            + ", ".join(map(str, s["betas"]))
            + "): "
            + "; ".join(
                f"`{st}` " + ", ".join(f"{v:.1f}" for v in per_beta.values())
                for st, per_beta in bits.items()
            )
            + "."
        )
    floating = [st for st in s["states"] if st != "exact"]
    if "exact" in s["states"] and floating:
        out += [
            "",
            "Deepest step count up to which each other state's gradient error stays within "
            f"{HELD:g}× of `exact`'s (every smaller measured count included; 0: not even at "
            f"{s['steps'][0]} step). For a bfloat16 `fn` the bfloat16 floor hides smaller "
            "differences:",
            "",
            "| block | fn | β | " + " | ".join(floating) + " |",
            "|---|---|---|" + "---:|" * len(floating),
        ]
        for name, blk in data["blocks"].items():
            idx = lookup(blk)
            for fn in s["fn_dtypes"]:
                for b in s["betas"]:
                    depths = [held_depth(idx, fn, b, st, s["steps"]) for st in floating]
                    out.append(f"| {name} | {fn} | {b} | " + " | ".join(map(str, depths)) + " |")
    return out


def grad_error_sections(data, betas) -> list[str]:
    """One gradient-error table per (block, fn dtype), rows (β, state)."""
    s = data["settings"]
    out = []
    for name, blk in data["blocks"].items():
        for fn in s["fn_dtypes"]:
            same = fn in s["same_refs_for"]
            table = error_table(blk, s, fn, betas, "grad_err", same_rows=same)
            out += [f"### {name}, fn {fn}", "", *table, ""]
    return out


def write_markdown(data, path) -> None:
    s = data["settings"]
    m = data["meta"]
    main_betas = [b for b in s["betas"] if b in (0.8, 0.9)] or list(s["betas"])
    rest_betas = [b for b in s["betas"] if b not in main_betas]
    out = [
        "# Precision of the reversible state",
        "",
        *h.provenance(data, "precision"),
        f"- {m['compile_s'] / 60:.1f} min of the run was compiling.",
        f"- One solve per batch of {s['batch']} examples (`fn` is the block `jax.vmap`ped "
        "over the batch), `z0 = 0`, `tol=0` (exactly `max_steps` steps), "
        "`ReversibleAdjoint(on_mismatch='ignore', report=...)`, loss `sum(sin(value))`, "
        "gradient w.r.t. every block parameter and the input. States: `float32` = "
        "`FloatState(jnp.float32)`, `float32x2` = `TwoFloatState()`, `float64` = "
        "`FloatState(jnp.float64)`, `exact` = `ExactState()` (32 fraction bits, lattice "
        "1 ulp and 6 guard bits, refined to 1/4 ulp and 7 (β 0.5, 0.9) or 1/8 ulp and 8 "
        "(β 0.8) in the same buffer: tolerance at least 31.5 ulps), `exact-nolattice` = "
        "`ExactState(guard_bits=0)` (the previous exact state).",
        "- Blocks (`benchmarks/blocks.py`): "
        + "; ".join(
            f"**{name}**: {blk['description']}, {blk['num_params']} parameters, state "
            f"{blk['batch']} × {tuple(blk['example_shape'])} = {blk['state_elements']} "
            "elements"
            for name, blk in data["blocks"].items()
        )
        + ".",
        "",
        NOTES,
        "## What this shows",
        "",
        *summary(data),
        "",
        "## Per-example `jax.vmap`",
        "",
        "Each example of the batch solved on its own, `jax.vmap(solve)`, fn float32, one "
        "program per cell (as a vmapped train step is compiled): the setting in which the "
        "previous exact state (`exact-nolattice`) lost exactness, because XLA batches and "
        "fuses the backward pass's re-evaluation of `fn` differently from the forward's.",
        "",
        *vmap_table(data),
        "",
        "Blocks: "
        + "; ".join(
            f"**{name}**: {v['description']}, {v['num_params']} parameters"
            for name, v in data.get("vmap", {}).items()
        )
        + f", batch {s['batch']}. Gradient error against the float64 unrolled gradient of "
        "the same per-example solves.",
        "",
        "## Headline: gradient error",
        "",
    ]
    for n in sorted({n for n in s["timing_steps"] if n in s["steps"]} | {max(s["steps"])}):
        out += [f"At {n} steps:", "", *headline_table(data, main_betas, n), ""]
    out += [
        "## Cost of each state option",
        "",
        "Median time of one jitted value-and-grad step (timed interleaved, ratio to the "
        "float32 state in the same rounds), and compiled temp memory of the same program. "
        "`benchmarks/results/exact.md` compares `exact` with `exact-nolattice` on all "
        "three blocks.",
        "",
    ]
    for name, blk in data["blocks"].items():
        for fn in s["fn_dtypes"]:
            out += [f"### {name}, fn {fn}", "", *cost_table(blk, s, fn), ""]
    out += ["## Gradient error", "", *grad_error_sections(data, main_betas)]
    if data.get("side_random_z0"):
        side = data["side_random_z0"]
        out += [
            f"### {side['block']}, fn {side['fn_dtype']}, β={side['beta']}: "
            f"from z0 = 0 and from z0 = {side['z0']}",
            "",
            "With `z0 = 0` the first evaluation of the conv block sees `W1 * z0 = 0`, "
            "whose GroupNorm is exactly 0, i.e. every element of the first ReLU sits on "
            "its kink (`relu'(0) = 0` in JAX). The backward pass evaluates the block at the "
            "*reconstructed* z0: any reconstruction error, however small, moves it off the "
            "kink and switches `relu'` to 1 for about half the elements. States that "
            "rebuild z0 to the bit are unaffected. The same gradient errors from a random "
            "initial state:",
            "",
            *side_table(data),
            "",
        ]
    out += [
        "## The backward pass's own report",
        "",
        "Relative deviation of the rebuilt initial state, ✗ where the pass flagged a mismatch.",
        "",
    ]
    for name, blk in data["blocks"].items():
        for fn in s["fn_dtypes"]:
            out += [
                f"### {name}, fn {fn}",
                "",
                *error_table(blk, s, fn, s["betas"], "report"),
                "",
            ]
        if "exact" in s["states"]:
            out += [
                f"`exact` drift on {name} (ulps of the leaf's largest binade; exact below 31.5):",
                "",
                *drift_table(blk, s, s["betas"]),
                "",
            ]
    if rest_betas:
        out += ["## Appendix: gradient error at the other β", ""]
        out += grad_error_sections(data, rest_betas)
    out += [
        "Block wall times: "
        + ", ".join(
            f"{name} {blk['wall_s'] / 60:.1f} min ({blk['compile_s'] / 60:.1f} compiling)"
            for name, blk in data["blocks"].items()
        )
        + ".",
        "",
    ]
    path.write_text("\n".join(out))


STYLE = {
    "float32": dict(color="C0", marker="o"),
    "float32x2": dict(color="C1", marker="s"),
    "float64": dict(color="C2", marker="^"),
    "exact": dict(color="C3", marker="D"),
    "exact-nolattice": dict(color="C4", marker="P", ls=":"),
}
CAP = 10.0  # errors above this (or non-finite) are drawn at the top edge of a panel


def plot_series(ax, xs, series) -> None:
    """Log-scale error curves; non-finite or > CAP at the top edge (X), 0 at the bottom."""
    shown = [v for _, vals, _ in series for v in vals if v is not None and math.isfinite(v)]
    shown = [v for v in shown if 0 < v <= CAP]
    lo = min(shown, default=1e-7) / 10
    over = any(
        v is not None and (not math.isfinite(v) or v > CAP) for _, vals, _ in series for v in vals
    )
    hi = CAP if over else max(shown, default=1.0) * 2
    for label, vals, style in series:
        ys = []
        for v in vals:
            if v is None:
                ys.append(np.nan)
            elif not math.isfinite(v) or v > CAP:
                ys.append(hi)
            else:
                ys.append(lo if v == 0 else v)
        ax.plot(xs, ys, label=label, **style)
        for x, v, y in zip(xs, vals, ys):
            if v is not None and (not math.isfinite(v) or v > CAP):
                ax.plot(x, y, marker="X", ms=11, color=style["color"], ls="none")
            elif v == 0:
                ax.plot(x, y, marker="v", ms=10, color=style["color"], ls="none")
    ax.set_ylim(lo / 2, hi * 2)


def plot(data, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    s = data["settings"]
    cols = [(name, fn) for fn in s["fn_dtypes"] for name in data["blocks"]]
    betas = s["betas"]
    vmap = data.get("vmap", {})
    has_vmap = bool(vmap)
    nrows = len(betas) + has_vmap
    fig, axes = plt.subplots(
        nrows, len(cols), figsize=(max(10.0, 4.2 * len(cols)), 3.4 * nrows + 1.4), squeeze=False
    )
    for j, (name, fn) in enumerate(cols):
        idx = lookup(data["blocks"][name])
        for i, b in enumerate(betas):
            series = []
            for st in s["states"]:
                vals = [idx[(fn, b, st, n)]["grad_err"] for n in s["steps"]]
                series.append((st, vals, dict(**STYLE.get(st, {}))))
                if fn in s["same_refs_for"] and st in SAME_REF_STATES:
                    vals = [idx[(fn, b, st, n)]["grad_err_same"] for n in s["steps"]]
                    style = dict(color=STYLE[st]["color"], marker="x", ls="--", alpha=0.7)
                    series.append((f"{st} vs same-precision unrolled", vals, style))
            ax = axes[i, j]
            plot_series(ax, s["steps"], series)
            h.log_axes(ax, s["steps"], xlabel="steps")
            ax.set_title(f"{name}, fn {fn}, β={b}", fontsize=10)
            if j == 0:
                ax.set_ylabel("grad rel. error (worst leaf)")
    if has_vmap:
        # Last row: per-example vmap, one panel per block (both betas), fn float32.
        panels = list(vmap)[: len(cols)]
        for j in range(len(cols)):
            ax = axes[-1, j]
            if j >= len(panels):
                ax.axis("off")
                continue
            vidx = {(r["beta"], r["state"], r["steps"]): r for r in vmap[panels[j]]["rows"]}
            series = [
                (
                    f"{st}, β={b}" if k else st,
                    [vidx[(b, st, n)]["grad_err"] for n in s["vmap_steps"]],
                    dict(**STYLE[st]) | ({"ls": "--", "alpha": 0.6} if k else {}),
                )
                for st in s["vmap_states"]
                for k, b in enumerate(s["vmap_betas"])
                if all((b, st, n) in vidx for n in s["vmap_steps"])
            ]
            plot_series(ax, s["vmap_steps"], series)
            h.log_axes(ax, s["vmap_steps"], xlabel="steps")
            betas_text = " (solid), ".join(map(str, s["vmap_betas"])) + " (dashed)"
            ax.set_title(f"{panels[j]}, per-example vmap, β={betas_text}", fontsize=9)
    handles, labels = [], []
    for ax in axes.flat:
        for hd, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(hd)
                labels.append(lab)
    gray = dict(color="gray", ls="none", ms=9)
    handles += [Line2D([], [], marker="X", **gray), Line2D([], [], marker="v", **gray)]
    labels += [f"non-finite or > {CAP:g} (top edge)", "exactly 0 (bottom edge)"]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9)
    fig.suptitle(
        "ReversibleAdjoint gradient error (worst leaf) against the float64 unrolled gradient; "
        "dashed: against the unrolled gradient of the same bfloat16 computation and state",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 1.1 / (3.4 * nrows + 1.4), 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--blocks", nargs="+", choices=list(blocks_lib.BLOCKS), default=None)
    parser.add_argument("--betas", nargs="+", type=float, default=None)
    parser.add_argument("--steps", nargs="+", type=int, default=None)


def main(argv=None) -> dict[str, Any]:
    return h.cli(
        "precision", __doc__, run, write_markdown, plot, argv=argv, add_arguments=add_arguments
    )


if __name__ == "__main__":
    main()
