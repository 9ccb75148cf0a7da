"""Precision study of the reversible solver's state: which `state_dtype` keeps the
reversible gradient exact, at what depth, and what it costs.

    python -m benchmarks.precision [--quick] [--out benchmarks/results]

`Reversible(beta, state_dtype=S)` with `ReversibleAdjoint()` rebuilds the forward
trajectory backwards, and every inverse step divides by `1 - beta`, so rounding errors
are amplified about `1/|1 - beta|` times per step. For the attention and the conv +
GroupNorm block of `benchmarks/blocks.py` (one solve of a small batch, `fn` the block
`jax.vmap`ped over the batch), each `beta`, each number of steps (`tol=0`: every solve
takes exactly `max_steps` steps), each state option

* `float32`: `state_dtype=jnp.float32` (for a float32 `fn` the default, `None`),
* `float32x2`: two-float state, about 48 bits, no 64-bit types,
* `float64`: float64 state and solver arithmetic (64-bit switched on only there),
* `exact`: fixed-point int64 state plus an information buffer, bit-exact reversal,

and each dtype of `fn` (float32, bfloat16: block, input and `z0` cast), it measures

* the reconstruction error, `rdeq.reconstruction_error(...)["rel"]`;
* the gradient error: the largest over the leaves (every block parameter and the input)
  of `||g - g_ref|| / ||g_ref||`, for the loss `sum(sin(value))`, against the gradient of
  the same solve unrolled in float64 (`UnrolledAdjoint`, `Reversible(beta)`, block, input
  and `z0` cast to float64 under `jax.enable_x64(True)`); for a bfloat16 `fn` also
  against the unrolled gradient of the same bfloat16 computation with the same floating
  state (float32 and float64 states);
* the median time of one jitted value-and-grad step at a few step counts, timed
  interleaved (every round times every state option once, in a fresh random order), and
  its ratio to the float32 state measured in the same rounds;
* compiled memory, `memory_analysis().temp_size_in_bytes`, and its ratio to float32.

Writes `precision.md`, `precision.json` and `precision.png` into `--out`; `--replot`
rewrites the first and last from the JSON. `--quick` runs one `beta`, three step counts
and fewer timing rounds (about 5 minutes). The full run compiles about 800 solves, which
is most of its ~23 minutes on 2 shared CPU cores.
"""

import argparse
import dataclasses
import datetime
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from tqdm.auto import tqdm

import revdeq_jax as rdeq

from . import blocks as blocks_lib
from .adjoints import (
    fmt_load,
    from_json,
    jsonable,
    machine_info,
    memory_of,
    time_interleaved,
    to_numpy64,
)


# name -> `state_dtype` argument of `Reversible`.
STATES: dict[str, Any] = {
    "float32": jnp.float32,
    "float32x2": "float32x2",
    "float64": jnp.float64,
    "exact": "exact",
}
# States with a floating unrolled counterpart of the very same computation (UnrolledAdjoint
# cannot differentiate the two-float error-free transformations meaningfully, and refuses
# the integer arithmetic of "exact").
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
    # bf16 same-computation unrolled references: their own programs, per (block, beta).
    same_refs_for: tuple[str, ...] = ("bfloat16",)
    max_rounds: int = 7  # interleaved timing rounds per (block, fn dtype), at most
    min_rounds: int = 3
    round_budget_s: float = 45.0  # timing time per (block, fn dtype); fewer rounds if over
    min_sample_s: float = 0.02  # fast calls are repeated so a sample lasts this long
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
    max_rounds=3,
    min_rounds=2,
    round_budget_s=8.0,
    min_sample_s=0.01,
    side_steps=(1, 4),
)


# ---------------------------------------------------------------------------------------
# The programs that are measured.


class Batched(eqx.Module):
    """`fn(z, x)` of a whole batch: the block `jax.vmap`ped inside `fn`, so that the batch
    is one solve (one state, one backward pass)."""

    block: eqx.Module

    def __call__(self, z, x):
        return jax.vmap(self.block)(z, x)


def make_value_and_grad(static, state, beta: float, steps: int, adjoint, z0=None) -> Callable:
    """`(params, xs) -> (loss, (params_grad, xs_grad))` with `loss = sum(sin(value))`,
    from `z0` (default zeros; an array is cast to the dtype of `xs`)."""
    solver = rdeq.Reversible(beta, state_dtype=state)

    def loss(params, xs):
        fn = Batched(eqx.combine(params, static))
        init = jnp.zeros_like(xs) if z0 is None else z0.astype(xs.dtype)
        sol = rdeq.fixed_point(
            fn, init, xs, solver=solver, adjoint=adjoint, max_steps=steps, tol=0.0
        )
        value = sol.value
        return jnp.sum(jnp.sin(value.astype(jnp.promote_types(value.dtype, jnp.float32))))

    return jax.value_and_grad(loss, argnums=(0, 1))


def compile_timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def grad_leaves(out) -> tuple[float, list[np.ndarray]]:
    loss, grads = out
    return float(loss), to_numpy64(grads)


def rel_error(grads: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, float]:
    """(worst leaf, global): the largest per-leaf `||g - ref|| / ||ref||`, and the same
    over all leaves together. NaN if any leaf is not finite."""
    per_leaf = []
    num = den = 0.0
    for g, r in zip(grads, ref, strict=True):
        if not np.all(np.isfinite(g)):
            return math.nan, math.nan
        d = float(np.sum(np.square(g - r)))
        n = float(np.sum(np.square(r)))
        per_leaf.append(math.sqrt(d) / max(math.sqrt(n), 1e-300))
        num += d
        den += n
    return max(per_leaf), math.sqrt(num) / max(math.sqrt(den), 1e-300)


def float64_reference(static64, beta: float, steps: tuple[int, ...], z0=None):
    """One compiled program: the float64 unrolled gradient at every step count. Compiled
    and called inside `jax.enable_x64(True)`; the caller passes float64 parameters (cast
    from the float32 or the bfloat16 block, so one compile serves both)."""

    def all_grads(p, x):
        return [
            make_value_and_grad(static64, None, beta, n, rdeq.UnrolledAdjoint(), z0)(p, x)
            for n in steps
        ]

    return all_grads


def same_precision_reference(static, beta: float, steps: tuple[int, ...], states):
    """The unrolled gradient of the very computation the reversible gradient differentiates
    (same `fn` dtype, same floating state), at every step count, for `states`."""

    def all_grads(p, x):
        return {
            s: [
                make_value_and_grad(static, STATES[s], beta, n, rdeq.UnrolledAdjoint())(p, x)
                for n in steps
            ]
            for s in states
        }

    return all_grads


def reconstruction_program(static, beta: float, steps: tuple[int, ...], states):
    """`reconstruction_error(...)["rel"]` of every state at every step count."""

    def run(p, x):
        fn = Batched(eqx.combine(p, static))
        return {
            s: [
                rdeq.reconstruction_error(
                    fn,
                    jnp.zeros_like(x),
                    x,
                    solver=rdeq.Reversible(beta, state_dtype=STATES[s]),
                    max_steps=n,
                    tol=0.0,
                )["rel"]
                for n in steps
            ]
            for s in states
        }

    return run


def bundled_gradients(static, beta: float, steps: tuple[int, ...], states, z0=None):
    """The reversible gradient of every state at several step counts, one program."""

    def run(p, x):
        return {
            s: [
                make_value_and_grad(static, STATES[s], beta, n, rdeq.ReversibleAdjoint(), z0)(p, x)
                for n in steps
            ]
            for s in states
        }

    return run


# ---------------------------------------------------------------------------------------
# One block.


def separate_steps(settings: Settings, beta: float) -> tuple[int, ...]:
    """Step counts whose gradient programs are compiled one per state at this `beta`: the
    timed ones at the timing betas, and the memory step count at every beta."""
    timed = settings.timing_steps if beta in settings.timing_betas else ()
    mem = (max(settings.timing_steps),) if settings.timing_steps else ()
    return tuple(n for n in settings.steps if n in timed or n in mem)


class Compiler:
    """Compiles, and keeps a log of what took how long."""

    def __init__(self):
        self.log: list[dict[str, Any]] = []

    def __call__(self, what: str, solves: int, fn, *args):
        compiled, dt = compile_timed(fn, *args)
        self.log.append({"what": what, "solves": solves, "compile_s": dt})
        return compiled

    @property
    def total_s(self) -> float:
        return sum(c["compile_s"] for c in self.log)


def run_block(name: str, settings: Settings, key, bar) -> dict[str, Any]:
    block_start = time.perf_counter()
    description, _, shape = blocks_lib.BLOCKS[name]
    block32, xs32, _ = blocks_lib.make(name, settings.batch, key=key)
    num_params = sum(x.size for x in jtu.tree_leaves(eqx.filter(block32, eqx.is_array)))
    steps = settings.steps
    states = settings.states
    compiler = Compiler()
    rows: list[dict[str, Any]] = []
    ref_programs: dict[float, Any] = {}  # beta -> compiled float64 reference
    timing: dict[str, Any] = {}

    for fn_name in settings.fn_dtypes:
        dtype = FN_DTYPES[fn_name]
        block = blocks_lib.cast_floats(block32, dtype)
        xs = xs32.astype(dtype)
        params, static = eqx.partition(block, eqx.is_inexact_array)
        programs: dict[str, tuple[Callable, tuple]] = {}
        for beta in settings.betas:
            tag = f"{name}, {fn_name}, β={beta}"
            # The float64 reference, from this block's (possibly bf16-rounded) parameters;
            # one compiled program serves both fn dtypes.
            bar.set_postfix_str(f"{tag}: float64 unrolled reference")
            with jax.enable_x64(True):
                p64 = blocks_lib.cast_floats(params, jnp.float64)
                x64 = xs.astype(jnp.float64)
                if beta not in ref_programs:
                    static64 = eqx.partition(
                        blocks_lib.cast_floats(block, jnp.float64), eqx.is_inexact_array
                    )[1]
                    ref_programs[beta] = compiler(
                        f"float64 reference, β={beta}",
                        len(steps),
                        float64_reference(static64, beta, steps),
                        p64,
                        x64,
                    )
                    bar.update()
                refs = [grad_leaves(out)[1] for out in ref_programs[beta](p64, x64)]

            same = {}
            same_states = [s for s in SAME_REF_STATES if s in states]
            if fn_name in settings.same_refs_for and same_states:
                bar.set_postfix_str(f"{tag}: same-precision unrolled references")
                prog = compiler(
                    f"{fn_name} same-precision references, β={beta}",
                    len(steps) * len(same_states),
                    same_precision_reference(static, beta, steps, same_states),
                    params,
                    xs,
                )
                same = {
                    s: [grad_leaves(out)[1] for out in outs] for s, outs in prog(params, xs).items()
                }
                del prog
                bar.update()

            bar.set_postfix_str(f"{tag}: reconstruction errors")
            prog = compiler(
                f"{fn_name} reconstruction errors, β={beta}",
                len(steps) * len(states),
                reconstruction_program(static, beta, steps, states),
                params,
                xs,
            )
            recon = {s: [float(v) for v in vals] for s, vals in prog(params, xs).items()}
            del prog
            bar.update()

            grads: dict[tuple[str, int], tuple[float, list[np.ndarray]]] = {}
            memory: dict[tuple[str, int], dict[str, float]] = {}
            alone = separate_steps(settings, beta)
            bundled = tuple(n for n in steps if n not in alone)
            if bundled:
                bar.set_postfix_str(f"{tag}: reversible gradients at {len(bundled)} step counts")
                prog = compiler(
                    f"{fn_name} reversible gradients, β={beta}, steps {bundled}",
                    len(bundled) * len(states),
                    bundled_gradients(static, beta, bundled, states),
                    params,
                    xs,
                )
                for s, outs in prog(params, xs).items():
                    for n, out in zip(bundled, outs):
                        grads[(s, n)] = grad_leaves(out)
                del prog
                bar.update()
            for n in alone:
                for s in states:
                    bar.set_postfix_str(f"{tag}: reversible gradient, {s}, {n} steps")
                    compiled = compiler(
                        f"{fn_name} reversible gradient, β={beta}, {s}, {n} steps",
                        1,
                        make_value_and_grad(static, STATES[s], beta, n, rdeq.ReversibleAdjoint()),
                        params,
                        xs,
                    )
                    grads[(s, n)] = grad_leaves(compiled(params, xs))
                    memory[(s, n)] = memory_of(compiled)
                    if beta in settings.timing_betas and n in settings.timing_steps:
                        programs[f"{s}/{beta}/{n}"] = (compiled, (params, xs))
                    bar.update()

            for s in states:
                for i, n in enumerate(steps):
                    loss, g = grads[(s, n)]
                    err, err_global = rel_error(g, refs[i])
                    row = {
                        "fn_dtype": fn_name,
                        "beta": beta,
                        "state": s,
                        "steps": n,
                        "loss": loss,
                        "recon_rel": recon[s][i],
                        "grad_err": err,
                        "grad_err_global": err_global,
                        "grad_err_same": None,
                        "grad_err_same_global": None,
                    }
                    row["recon_rel_suspect"] = recon_suspect(row)
                    if s in same:
                        row["grad_err_same"], row["grad_err_same_global"] = rel_error(g, same[s][i])
                    if (s, n) in memory:
                        row["memory"] = memory[(s, n)]
                        base = memory.get(("float32", n))
                        row["temp_ratio"] = (
                            row["memory"]["temp_mib"] / base["temp_mib"] if base else math.nan
                        )
                    rows.append(row)

        if programs:
            bar.set_postfix_str(f"{name}, {fn_name}: timing")
            t = time_interleaved(
                programs,
                settings,
                np.random.default_rng(settings.seed),
                desc=f"timing {name} {fn_name}",
            )
            timing[fn_name] = t
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
        "num_params": int(num_params),
        "rows": rows,
        "compiles": compiler.log,
        "compile_s": compiler.total_s,
        "wall_s": time.perf_counter() - block_start,
    }


def side_random_z0(settings: Settings, key, bar) -> dict[str, Any] | None:
    """The conv block at `z0 = 0` sits exactly on ReLU kinks (GroupNorm of the all-zero
    `W1 * z0` is exactly 0), so a reconstruction of `z0` that is off by any amount flips
    `relu'` there. The same measurement from a random `z0 = 0.1 N(0, 1)` separates that
    from the amplification of rounding errors."""
    if not settings.side_steps or settings.side_block not in settings.blocks:
        return None
    start = time.perf_counter()
    name = settings.side_block
    beta = settings.side_beta
    steps = settings.side_steps
    kb, kz = key
    block, xs, _ = blocks_lib.make(name, settings.batch, key=kb)
    params, static = eqx.partition(block, eqx.is_inexact_array)
    z0 = 0.1 * jax.random.normal(kz, xs.shape, xs.dtype)
    compiler = Compiler()
    bar.set_postfix_str(f"side: {name}, random z0, float64 reference")
    with jax.enable_x64(True):
        p64 = blocks_lib.cast_floats(params, jnp.float64)
        x64 = xs.astype(jnp.float64)
        static64 = eqx.partition(blocks_lib.cast_floats(block, jnp.float64), eqx.is_inexact_array)[
            1
        ]
        prog = compiler(
            "side: float64 reference",
            len(steps),
            float64_reference(static64, beta, steps, z0),
            p64,
            x64,
        )
        refs = [grad_leaves(out)[1] for out in prog(p64, x64)]
    bar.update()
    bar.set_postfix_str(f"side: {name}, random z0, reversible gradients")
    prog = compiler(
        "side: reversible gradients",
        len(steps) * len(settings.states),
        bundled_gradients(static, beta, steps, settings.states, z0),
        params,
        xs,
    )
    rows = []
    for s, outs in prog(params, xs).items():
        for n, out, ref in zip(steps, outs, refs):
            err, err_global = rel_error(grad_leaves(out)[1], ref)
            rows.append({"state": s, "steps": n, "grad_err": err, "grad_err_global": err_global})
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
        per_block += 1 + same + len(settings.fn_dtypes) * per_fn
    if set(settings.timing_betas) & set(settings.betas):
        per_block += len(settings.fn_dtypes)
    side = 2 if settings.side_steps and settings.side_block in settings.blocks else 0
    return per_block * len(settings.blocks) + side


# ---------------------------------------------------------------------------------------
# Reporting.


def fmt_err(x) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return "non-finite"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def recon_suspect(row) -> bool:
    """`reconstruction_error` said 0 for a floating state whose gradient in the same
    configuration is non-finite: the reconstruction overflowed to NaN, and XLA:CPU's
    max-reduction over >= 4096 elements skips NaNs (returns -inf), so the library's
    `max(0, max|deviation|)` reads 0."""
    g = row["grad_err"]
    return (
        row["state"] != "exact"
        and row["recon_rel"] == 0
        and isinstance(g, float)
        and not math.isfinite(g)
    )


def fmt_cell(row, field: str) -> str:
    if field == "recon_rel" and recon_suspect(row):
        return "0†"
    return fmt_err(row[field])


def fmt_ratio(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}"


def lookup(blk) -> dict[tuple, dict[str, Any]]:
    return {(r["fn_dtype"], r["beta"], r["state"], r["steps"]): r for r in blk["rows"]}


def error_table(blk, s, fn, betas, field: str, *, same_rows: bool = False) -> list[str]:
    """Rows = (beta, state), columns = steps."""
    idx = lookup(blk)
    steps = s["steps"]
    out = [
        "| β | state | " + " | ".join(str(n) for n in steps) + " |",
        "|---|---|" + "---:|" * len(steps),
    ]
    for beta in betas:
        for st in s["states"]:
            cells = [fmt_cell(idx[(fn, beta, st, n)], field) for n in steps]
            out.append(f"| {beta} | {st} | " + " | ".join(cells) + " |")
        if same_rows:
            for st in s["states"]:
                vals = [idx[(fn, beta, st, n)]["grad_err_same"] for n in steps]
                out.append(
                    f"| {beta} | {st}, vs same-precision unrolled | "
                    + " | ".join(fmt_err(v) for v in vals)
                    + " |"
                )
    return out


def cost_table(blk, s, fn) -> list[str]:
    idx = lookup(blk)
    tsteps = [n for n in s["steps"] if n in s["timing_steps"]]
    tbetas = [b for b in s["timing_betas"] if b in s["betas"]]
    head = "| state |"
    sep = "|---|"
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
                line += f" {r['time']['median_ms']:.1f} | {fmt_ratio(r['time_ratio'])} |"
        for b in s["betas"]:
            r = idx[(fn, b, st, mem_n)]
            line += f" {r['memory']['temp_mib']:.2f} | {fmt_ratio(r['temp_ratio'])} |"
        out.append(line)
    return out


def headline_table(data, betas, n: int) -> list[str]:
    s = data["settings"]
    head = "| block | fn | β | " + " | ".join(s["states"]) + " |"
    out = [head, "|---|---|---|" + "---:|" * len(s["states"])]
    for name, blk in data["blocks"].items():
        idx = lookup(blk)
        for fn in s["fn_dtypes"]:
            for b in betas:
                vals = [idx[(fn, b, st, n)]["grad_err"] for st in s["states"]]
                out.append(
                    f"| {name} | {fn} | {b} | " + " | ".join(fmt_err(v) for v in vals) + " |"
                )
    return out


NOTES = """Reading the tables:

- **grad err** is the worst leaf's `‖g − g_ref‖/‖g_ref‖` over every block parameter and
  the input (the JSON also has the error over all leaves together, `grad_err_global`),
  g_ref the float64 unrolled gradient of the same model: `UnrolledAdjoint`,
  `Reversible(beta)`, block, input and `z0` cast to float64 under
  `jax.enable_x64(True)`. For a bfloat16 `fn` the reference is built from the
  bfloat16-rounded parameters and input cast to float64, so it measures the error of the
  computation, not of quantising the model. It is still a float64 computation, so the
  bfloat16 rounding of `fn` itself sets a floor that no state option can remove (~1e-2
  and up; the `exact` row, whose reversal adds nothing, shows it). The rows "vs
  same-precision unrolled" compare instead with `UnrolledAdjoint` differentiating the
  very same bfloat16 computation with the same state: the part of the error that
  reversal adds. `float32x2` and `exact` have no floating unrolled
  counterpart (n/a): `UnrolledAdjoint` refuses the integer arithmetic of `exact`.
- **non-finite**: the reversed trajectory overflowed, so the gradient holds inf/NaN.
- A bfloat16 gradient compared with the unrolled gradient of the same bfloat16
  computation differs by a few bfloat16 ulps (~4e-3) even where the reconstruction is
  exact (attention block): parameter cotangents are summed in bfloat16, and autodiff's
  order inside a transposed scan is not reproduced bit for bit. 0 there (conv block)
  means identical bits.
- **recon** is `reconstruction_error(...)["rel"]`: the worst deviation of the rebuilt
  initial state from the true one over `max(max|z0|, 1)` (here `z0 = 0`, so absolute).
  0 means the backward pass rebuilt the forward iterates exactly.
- `exact` reverses to the bit at every depth, so its reversible gradient *is* the
  unrolled gradient of its own forward pass; what remains against the float64 reference
  is the rounding of `fn` (float32 or bfloat16) and of the 2^-32 fixed-point grid.
- Times are medians of interleaved rounds on a shared machine: ratios are measured within
  one run (same rounds) and differences under ~15% are noise. Memory is the compiled
  `temp_size_in_bytes` (deterministic).
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


def summary(data) -> list[str]:
    """'What this shows', from the numbers."""
    s = data["settings"]
    floating = [st for st in s["states"] if st != "exact"]
    out = []
    if "exact" in s["states"] and floating:
        out += [
            "Deepest step count up to which each floating state's gradient error stays "
            f"within {HELD:g}× of `exact`'s (every smaller measured count included; 0: not "
            f"even at {s['steps'][0]} step). For a bfloat16 `fn` the bfloat16 floor hides "
            "smaller differences, so read those rows with the 'vs same-precision "
            "unrolled' rows of the tables above:",
            "",
            "| block | fn | β | " + " | ".join(floating) + " |",
            "|---|---|---|" + "---:|" * len(floating),
        ]
        for name, blk in data["blocks"].items():
            idx = lookup(blk)
            for fn in s["fn_dtypes"]:
                for b in s["betas"]:
                    depths = [held_depth(idx, fn, b, st, s["steps"]) for st in floating]
                    out.append(
                        f"| {name} | {fn} | {b} | " + " | ".join(str(d) for d in depths) + " |"
                    )
        out.append("")
    # Cost, over both blocks and fn dtypes.
    timed = [r for blk in data["blocks"].values() for r in blk["rows"] if "time_ratio" in r]
    mem_n = max((n for n in s["steps"] if n in s["timing_steps"]), default=None)
    lines = []
    for st in s["states"]:
        if st == "float32":
            continue
        t = [r["time_ratio"] for r in timed if r["state"] == st]
        parts = []
        if t:
            parts.append(f"time ×{min(t):.2f}–{max(t):.2f}")
        mem = {}
        for b in s["betas"]:
            m = [
                r["temp_ratio"]
                for blk in data["blocks"].values()
                for r in blk["rows"]
                if r["state"] == st and r["beta"] == b and r["steps"] == mem_n and "temp_ratio" in r
            ]
            if m:
                mem[b] = f"×{min(m):.2f}–{max(m):.2f}"
        if mem and len(set(mem.values())) == 1:
            parts.append(f"memory {next(iter(mem.values()))} (every β)")
        else:
            parts += [f"memory at β={b} {v}" for b, v in mem.items()]
        if parts:
            lines.append(f"- `{st}`: " + ", ".join(parts) + ".")
    if lines:
        out += [
            "Cost relative to the float32 state, range over both blocks and both `fn` "
            f"dtypes (time at {', '.join(map(str, s['timing_steps']))} steps, β="
            f"{', '.join(map(str, s['timing_betas']))}; compiled temp memory at {mem_n} "
            "steps):",
            "",
            *lines,
        ]
    return out


def side_table(data) -> list[str]:
    side = data.get("side_random_z0")
    if not side:
        return []
    s = data["settings"]
    idx = lookup(data["blocks"][side["block"]])
    sidx = {(r["state"], r["steps"]): r for r in side["rows"]}
    steps = side["steps"]
    out = [
        "| state | z0 | " + " | ".join(str(n) for n in steps) + " |",
        "|---|---|" + "---:|" * len(steps),
    ]
    for st in s["states"]:
        main = [idx.get((side["fn_dtype"], side["beta"], st, n)) for n in steps]
        if any(m is not None for m in main):
            out.append(
                f"| {st} | 0 (main grid) | "
                + " | ".join("–" if m is None else fmt_err(m["grad_err"]) for m in main)
                + " |"
            )
        out.append(
            f"| {st} | {side['z0']} | "
            + " | ".join(fmt_err(sidx[(st, n)]["grad_err"]) for n in steps)
            + " |"
        )
    return out


def write_markdown(data, path: Path) -> None:
    s = data["settings"]
    m = data["meta"]
    main_betas = [b for b in s["betas"] if b in (0.8, 0.9)] or list(s["betas"])
    rest_betas = [b for b in s["betas"] if b not in main_betas]
    out = [
        "# Precision of the reversible state",
        "",
        f"Generated by `python -m benchmarks.precision{' --quick' if s['quick'] else ''}` "
        f"on {m['date']}; the run took {m['wall_s'] / 60:.1f} min "
        f"({m['compile_s'] / 60:.1f} min of it compiling).",
        "",
        f"- Machine: {m['machine']['cpu']}, {m['machine']['cores']} cores, backend "
        f"`{m['machine']['backend']}`; load average (1, 5, 15 min) at start "
        f"{fmt_load(m['load_start'])}, at end {fmt_load(m['load_end'])}.",
        f"- JAX {m['machine']['jax']}, jaxlib {m['machine']['jaxlib']}, Equinox "
        f"{m['machine']['equinox']}, revdeq_jax {m['machine']['revdeq_jax']}, Python "
        f"{m['machine']['python']}.",
        f"- One solve per batch of {s['batch']} examples (`fn` is the block `jax.vmap`ped "
        "over the batch), `z0 = 0`, `tol=0` (exactly `max_steps` steps), "
        "`ReversibleAdjoint()`, loss `sum(sin(value))`, gradient w.r.t. every block "
        "parameter and the input. States: `float32` = `state_dtype=jnp.float32`, "
        '`float32x2` = `"float32x2"`, `float64` = `jnp.float64`, `exact` = `"exact"` '
        "(`ExactState()`, 32 fraction bits).",
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
        "## Headline: gradient error",
        "",
    ]
    for n in sorted({n for n in s["timing_steps"] if n in s["steps"]} | {max(s["steps"])}):
        out += [f"At {n} steps:", "", *headline_table(data, main_betas, n), ""]
    out += [
        "## Cost of each state option",
        "",
        "Median time of one jitted value-and-grad step (timed interleaved, ratio to the "
        "float32 state in the same rounds), and compiled temp memory of the same program.",
        "",
    ]
    for name, blk in data["blocks"].items():
        for fn in s["fn_dtypes"]:
            out += [f"### {name}, fn {fn}", "", *cost_table(blk, s, fn), ""]
    out += ["## Gradient error", ""]
    for name, blk in data["blocks"].items():
        for fn in s["fn_dtypes"]:
            same = fn in s["same_refs_for"]
            out += [
                f"### {name}, fn {fn}",
                "",
                *error_table(blk, s, fn, main_betas, "grad_err", same_rows=same),
                "",
            ]
    side = data.get("side_random_z0")
    if side:
        out += [
            f"### {side['block']}, fn {side['fn_dtype']}, β={side['beta']}: "
            f"from z0 = 0 and from z0 = {side['z0']}",
            "",
            "With `z0 = 0` the first evaluation of the conv block sees `W1 * z0 = 0`, "
            "whose GroupNorm is exactly 0, i.e. every element of the first ReLU sits on "
            "its kink (`relu'(0) = 0` in JAX). The backward pass evaluates the block at the "
            "*reconstructed* z0: any reconstruction error, however small, moves it off the "
            "kink and switches `relu'` to 1 for about half the elements. States that "
            "rebuild z0 to the bit (`exact`; `float32x2` for one step) are unaffected. The "
            "same gradient errors from a random initial state:",
            "",
            *side_table(data),
            "",
        ]
    out += ["## What this shows", "", *summary(data), ""]
    out += ["## Appendix", ""]
    if rest_betas:
        out += ["### Gradient error at the other β", ""]
        for name, blk in data["blocks"].items():
            for fn in s["fn_dtypes"]:
                same = fn in s["same_refs_for"]
                out += [
                    f"#### {name}, fn {fn}",
                    "",
                    *error_table(blk, s, fn, rest_betas, "grad_err", same_rows=same),
                    "",
                ]
    out += [
        "### Reconstruction error, `reconstruction_error(...)['rel']`",
        "",
        "† `reconstruction_error` returned 0, but the gradient of the same configuration "
        "is non-finite: the reconstruction overflowed to NaN, and on XLA:CPU a "
        "max-reduction over 4096 or more elements skips NaNs (`jnp.max` of such an array "
        "gives -inf), so the library's `maximum(0, max|deviation|)` read 0. Read † as "
        "'overflowed'. (The library now reports a non-finite reconstruction as inf, so a "
        "rerun shows 'non-finite' there.)",
        "",
    ]
    for name, blk in data["blocks"].items():
        for fn in s["fn_dtypes"]:
            out += [
                f"#### {name}, fn {fn}",
                "",
                *error_table(blk, s, fn, s["betas"], "recon_rel"),
                "",
            ]
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
}
CAP = 10.0  # errors above this (or non-finite) are drawn at the top edge of a panel


def plot(data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    s = data["settings"]
    cols = [(name, fn) for fn in s["fn_dtypes"] for name in data["blocks"]]
    betas = s["betas"]
    fig, axes = plt.subplots(
        len(betas),
        len(cols),
        figsize=(max(10.0, 4.2 * len(cols)), 3.4 * len(betas) + 1.4),
        squeeze=False,
    )
    for j, (name, fn) in enumerate(cols):
        idx = lookup(data["blocks"][name])
        for i, b in enumerate(betas):
            ax = axes[i, j]
            series = []  # (label, values, style)
            for st in s["states"]:
                vals = [idx[(fn, b, st, n)]["grad_err"] for n in s["steps"]]
                series.append((st, vals, dict(**STYLE.get(st, {}))))
                if fn in s["same_refs_for"] and st in SAME_REF_STATES:
                    vals = [idx[(fn, b, st, n)]["grad_err_same"] for n in s["steps"]]
                    style = dict(color=STYLE[st]["color"], marker="x", ls="--", alpha=0.7)
                    series.append((f"{st} vs same-precision unrolled", vals, style))
            shown = [
                v
                for _, vals, _ in series
                for v in vals
                if v is not None and math.isfinite(v) and 0 < v <= CAP
            ]
            lo = min(shown, default=1e-7) / 10
            hi = (
                CAP
                if any(
                    v is not None and (not math.isfinite(v) or v > CAP)
                    for _, vals, _ in series
                    for v in vals
                )
                else max(shown, default=1.0) * 2
            )
            for label, vals, style in series:
                ys = []
                for v in vals:
                    if v is None:
                        ys.append(np.nan)
                    elif not math.isfinite(v) or v > CAP:
                        ys.append(hi)
                    elif v == 0:
                        ys.append(lo)
                    else:
                        ys.append(v)
                ax.plot(s["steps"], ys, label=label, **style)
                for n, v, y in zip(s["steps"], vals, ys):
                    if v is not None and (not math.isfinite(v) or v > CAP):
                        ax.plot(n, y, marker="X", ms=11, color=style["color"], ls="none")
                    elif v == 0:
                        ax.plot(n, y, marker="v", ms=10, color=style["color"], ls="none")
            ax.set_ylim(lo / 2, hi * 2)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(s["steps"])
            ax.set_xticklabels([str(n) for n in s["steps"]])
            ax.set_yscale("log")
            ax.set_title(f"{name}, fn {fn}, β={b}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(betas) - 1:
                ax.set_xlabel("steps")
            if j == 0:
                ax.set_ylabel("grad rel. error (worst leaf)")
    handles, labels = [], []
    for ax in axes.flat:  # union of legend entries over panels
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
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
    fig.tight_layout(rect=(0, 1.1 / (3.4 * len(betas) + 1.4), 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one beta, 3 step counts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--blocks", nargs="+", choices=("attention", "conv", "mlp"), default=None)
    parser.add_argument("--betas", nargs="+", type=float, default=None)
    parser.add_argument("--steps", nargs="+", type=int, default=None)
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only rewrite precision.md and precision.png from an existing precision.json",
    )
    args = parser.parse_args(argv)
    if args.replot:
        data = from_json(json.loads((args.out / "precision.json").read_text()))
        write_markdown(data, args.out / "precision.md")
        plot(data, args.out / "precision.png")
        return data
    settings = QUICK if args.quick else Settings()
    if args.blocks:
        settings = dataclasses.replace(settings, blocks=tuple(args.blocks))
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
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_start": machine_info()["loadavg"],
    }
    keys = jax.random.split(jax.random.key(settings.seed), len(settings.blocks))
    results = {}
    with tqdm(total=count_tasks(settings), desc="precision") as bar:
        for name, key in zip(settings.blocks, keys):
            results[name] = run_block(name, settings, key, bar)
        side = None
        if settings.side_block in settings.blocks:
            # the block of the main grid, and a key of its own for z0
            kb = keys[settings.blocks.index(settings.side_block)]
            kz = jax.random.fold_in(jax.random.key(settings.seed), 1)
            side = side_random_z0(settings, (kb, kz), bar)
    meta["wall_s"] = time.perf_counter() - start
    meta["compile_s"] = sum(b["compile_s"] for b in results.values()) + (
        side["compile_s"] if side else 0.0
    )
    meta["load_end"] = machine_info()["loadavg"]
    data = {
        "meta": meta,
        "settings": {**dataclasses.asdict(settings), "quick": args.quick},
        "blocks": results,
        "side_random_z0": side,
    }
    (args.out / "precision.json").write_text(json.dumps(jsonable(data), indent=1))
    data = from_json(json.loads((args.out / "precision.json").read_text()))
    write_markdown(data, args.out / "precision.md")
    plot(data, args.out / "precision.png")
    print(f"wrote {args.out}/precision.{{md,json,png}} in {meta['wall_s'] / 60:.1f} min")
    return data


if __name__ == "__main__":
    main()
