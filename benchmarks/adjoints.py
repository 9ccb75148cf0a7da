"""Adjoint comparison: time, compiled memory and gradient error of one jitted gradient step.

    python -m benchmarks.adjoints [--quick] [--out benchmarks/results]

For three equilibrium blocks (attention, conv + GroupNorm, MLP; `benchmarks/blocks.py`),
batched with `jax.vmap`, at several `max_steps` (`tol=0`, so every solve runs all its
steps), and for each way of differentiating the solve, it measures

* the median wall time of one jitted gradient step, timed interleaved: every round times
  every configuration of the block once, in a fresh random order (these machines are
  shared and noisy, so slow drifts hit all configurations alike), compile excluded;
* compiled memory, `jax.jit(grad).lower(...).compile().memory_analysis()`;
* the relative error of the gradient (parameters and input) against the gradient of the
  same computation unrolled in float64 (`UnrolledAdjoint`, block cast to float64, inside
  `jax.enable_x64(True)`);
* `revdeq_jax.reconstruction_error` for the reversible configurations;
* forward evaluations (`sol.nfe`) and backward evaluations;

plus, in the same interleaved rounds, the cost `f` of one batched evaluation of the block
and `b` of one VJP of it, for the cost model `(4f + 2b) / (2f + 2b)` of
`ReversibleAdjoint` relative to `UnrolledAdjoint`; the same costs inside a `lax.scan`
body (loop overhead; for the conv block also written channels-first); and, at one step
count, the solve `vmap`ped per example against one solve of the whole batch.

Writes `adjoints.md`, `adjoints.json` and `adjoints.png` into `--out`;
`--replot` rewrites the first and last from the JSON. `--quick` runs two step counts,
fewer rounds and no side measurements. Compiling ~100 programs is most of the run time.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
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


MiB = 2.0**20


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: tuple[int, ...] = (4, 8, 16, 32, 64)
    blocks: tuple[str, ...] = ("attention", "conv", "mlp")
    batch: int = 8
    beta: float = 0.5
    max_rounds: int = 9  # interleaved timing rounds per block (at most)
    min_rounds: int = 3
    round_budget_s: float = 40.0  # timing time per block; fewer rounds if exceeded
    min_sample_s: float = 0.02  # fast calls are repeated so a sample lasts this long
    chain: int = 8  # evaluations per measurement of f and b
    side_steps: int = 16  # steps of the vmap-vs-batched-fn side experiment
    side_experiment: bool = True
    conv_layouts: bool = True  # measure a channels-first conv inside loops
    micro: tuple[str, ...] | None = None  # which f/b programs (None: all)
    seed: int = 0


QUICK = Settings(
    steps=(4, 16),
    max_rounds=3,
    min_rounds=2,
    round_budget_s=8.0,
    min_sample_s=0.01,
    side_experiment=False,
    conv_layouts=False,
    micro=("f_chain", "fb_chain", "f_scan", "fb_scan"),
)


@dataclasses.dataclass(frozen=True)
class AdjointSpec:
    name: str
    label: str
    solver: Callable[[float], rdeq.AbstractSolver]
    adjoint: rdeq.AbstractAdjoint
    reversible: bool  # has a reconstruction error


ADJOINTS = (
    AdjointSpec(
        "reversible",
        "ReversibleAdjoint (f32 state)",
        lambda beta: rdeq.Reversible(beta),
        rdeq.ReversibleAdjoint(),
        True,
    ),
    AdjointSpec(
        "reversible_f64",
        "ReversibleAdjoint (f64 state)",
        lambda beta: rdeq.Reversible(beta, state_dtype=jnp.float64),
        rdeq.ReversibleAdjoint(),
        True,
    ),
    AdjointSpec(
        "unrolled",
        "UnrolledAdjoint",
        lambda beta: rdeq.Reversible(beta),
        rdeq.UnrolledAdjoint(),
        False,
    ),
    AdjointSpec(
        "checkpoint",
        "CheckpointAdjoint",
        lambda beta: rdeq.Reversible(beta),
        rdeq.CheckpointAdjoint(),
        False,
    ),
    AdjointSpec(
        "implicit",
        "ImplicitAdjoint (Anderson bwd, tol 1e-6, <=30)",
        lambda beta: rdeq.Reversible(beta),
        rdeq.ImplicitAdjoint(),
        False,
    ),
    AdjointSpec(
        "phantom",
        "PhantomAdjoint (JFB, 1 step)",
        lambda beta: rdeq.Reversible(beta),
        rdeq.PhantomAdjoint(),
        False,
    ),
)


# ---------------------------------------------------------------------------------------
# The programs that are measured.


class Batched(eqx.Module):
    """`fn(z, x)` of a whole batch: the block `jax.vmap`ped inside `fn`."""

    block: eqx.Module

    def __call__(self, z, x):
        return jax.vmap(self.block)(z, x)


def make_loss(static, target, solver, adjoint, steps: int, *, batched_fn: bool = False):
    """`loss(params, xs) -> (loss, nfe)`: mean squared distance of the fixed point from a
    fixed target. The solve is `jax.vmap`ped over the batch (each example its own solve),
    or with `batched_fn=True` run once on the whole batch with a batched `fn`."""

    def loss(params, xs):
        block = eqx.combine(params, static)
        if batched_fn:
            fn = Batched(block)
            sol = rdeq.fixed_point(
                fn,
                jnp.zeros_like(xs),
                xs,
                solver=solver,
                adjoint=adjoint,
                max_steps=steps,
                tol=0.0,
            )
            return 0.5 * jnp.mean(jnp.square(sol.value - target)), sol.nfe[None]

        def one(x, t):
            sol = rdeq.fixed_point(
                block,
                jnp.zeros_like(x),
                x,
                solver=solver,
                adjoint=adjoint,
                max_steps=steps,
                tol=0.0,
            )
            return 0.5 * jnp.mean(jnp.square(sol.value - t)), sol.nfe

        losses, nfe = jax.vmap(one)(xs, target)
        return jnp.mean(losses), nfe

    return loss


def grad_fn(loss):
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def memory_of(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    out = {}
    for field in (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    ):
        out[field.replace("_size_in_bytes", "_mib")] = getattr(m, field, 0) / MiB
    return out


def to_numpy64(tree):
    return [np.asarray(x, np.float64) for x in jtu.tree_leaves(tree)]


def rel_errors(grads: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, float]:
    """(global, worst leaf) relative error: `||g - ref|| / ||ref||` over all leaves
    together, and the largest per-leaf value."""
    num = sum(float(np.sum(np.square(g - r))) for g, r in zip(grads, ref, strict=True))
    den = sum(float(np.sum(np.square(r))) for r in ref)
    per_leaf = [
        float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-300))
        for g, r in zip(grads, ref, strict=True)
    ]
    return math.sqrt(num) / max(math.sqrt(den), 1e-300), max(per_leaf)


def reference_grads(params, static, xs, target, beta: float, steps: tuple[int, ...]):
    """Gradients of the unrolled computation in float64 (block, input and state), one
    per step count, from one compiled program."""
    with jax.enable_x64(True):
        p64 = blocks_lib.cast_floats(params, jnp.float64)
        x64 = xs.astype(jnp.float64)
        t64 = target.astype(jnp.float64)

        def all_grads(p, x):
            out = []
            for n in steps:
                loss = make_loss(static, t64, rdeq.Reversible(beta), rdeq.UnrolledAdjoint(), n)
                out.append(grad_fn(loss)(p, x)[1])
            return out

        return [to_numpy64(g) for g in jax.jit(all_grads)(p64, x64)]


def reconstruction_errors(block, xs, solver, steps: tuple[int, ...]) -> list[tuple[float, float]]:
    """Per step count: the largest `reconstruction_error(...)["abs"]` over the batch
    (solve `vmap`ped, as in the gradient), and that of the first example solved alone
    (no `vmap`). One compiled program for everything."""

    @eqx.filter_jit
    def run(block, xs):
        out = []
        for n in steps:
            recon = lambda x: rdeq.reconstruction_error(
                block, jnp.zeros_like(x), x, solver=solver, max_steps=n, tol=0.0
            )["abs"]
            out.append((jnp.max(jax.vmap(recon)(xs)), recon(xs[0])))
        return out

    return [(float(a), float(b)) for a, b in run(block, xs)]


def micro_programs(
    block, xs, chain: int, *, prefix: str = "", only: tuple[str, ...] | None = None
) -> dict[str, tuple[Callable, tuple]]:
    """Programs measuring one evaluation `f` and one VJP `f + b` of the batched block.

    `*_chain` run `chain` dependent evaluations in straight-line code (no dispatch cost,
    no loop); `*_scan` run the same chain as the body of a `lax.scan`; `*_single` is one
    jitted call (dispatch included); `fb_pe_chain` is the VJP that a `jax.vmap`ped
    custom-VJP backward takes, with one parameter cotangent per example."""
    params, static = eqx.partition(block, eqx.is_inexact_array)
    z = 0.1 * xs

    def f(p, z, x):
        return jax.vmap(eqx.combine(p, static))(z, x)

    def f_one(p, z, x):
        return eqx.combine(p, static)(z, x)

    def vjp_batched(p, z, x, ct):
        out, pull = jax.vjp(f, p, z, x)
        return out, pull(ct)

    def vjp_per_example(p, z, x, ct):
        def one(z, x, ct):
            out, pull = jax.vjp(f_one, p, z, x)
            return out, pull(ct)

        return jax.vmap(one)(z, x, ct)

    def f_single(p, z, x):
        return f(p, z, x)

    def fb_single(p, z, x):
        out, pull = jax.vjp(f, p, z, x)
        return out, pull(out)

    def f_chain(p, z, x):
        for _ in range(chain):
            z = f(p, z, x)
        return z

    def f_scan(p, z, x):
        body = lambda z, _: (f(p, z, x), None)
        return jax.lax.scan(body, z, None, length=chain)[0]

    def fb_step(vjp_fn, p, x, carry):
        # One VJP as a backward step takes it: the value feeds the next evaluation, the
        # cotangents are propagated and the parameter/input cotangents accumulated.
        z, ct, acc = carry
        z, (dp, dz, dx) = vjp_fn(p, z, x, ct)
        acc = jtu.tree_map(jnp.add, acc, (dp, dx))
        return z, 0.5 * dz, acc

    def fb_init(vjp_fn, p, z, x):
        ct = jnp.ones_like(z) / z.size
        shapes = jax.eval_shape(lambda: vjp_fn(p, z, x, ct)[1])
        acc = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[2]))
        return z, ct, acc

    def fb_chain_of(vjp_fn):
        def run(p, z, x):
            carry = fb_init(vjp_fn, p, z, x)
            for _ in range(chain):
                carry = fb_step(vjp_fn, p, x, carry)
            return carry

        return run

    def fb_scan(p, z, x):
        carry = fb_init(vjp_batched, p, z, x)
        body = lambda c, _: (fb_step(vjp_batched, p, x, c), None)
        return jax.lax.scan(body, carry, None, length=chain)[0]

    progs = {
        "f_single": f_single,
        "fb_single": fb_single,
        "f_chain": f_chain,
        "fb_chain": fb_chain_of(vjp_batched),
        "fb_pe_chain": fb_chain_of(vjp_per_example),
        "f_scan": f_scan,
        "fb_scan": fb_scan,
    }
    args = (params, z, xs)
    return {
        prefix + k: (jax.jit(v).lower(*args).compile(), args)
        for k, v in progs.items()
        if only is None or k in only
    }


def conv_layout_programs(xs, chain: int, key) -> dict[str, tuple[Callable, tuple]]:
    """f and f+b, straight-line and in a `lax.scan` body, for the conv block written
    channels-first with `eqx.nn.Conv2d` (as `revdeq_jax.nn.ConvResidualLayer` is)."""
    only = ("f_chain", "f_scan", "fb_chain", "fb_scan")
    nchw = blocks_lib.ConvBlockNCHW(xs.shape[-1], key=key)
    return micro_programs(nchw, jnp.moveaxis(xs, -1, 1), chain, prefix="nchw/", only=only)


def count_backward_evals(steps: tuple[int, ...]) -> dict[str, dict[int, dict[str, int]]]:
    """Evaluations of `fn` (`f`: primal calls under differentiation, `b`: pullbacks) made
    by the backward pass of each adjoint, counted at run time with a tiny counting `fn`.
    The counts depend only on `max_steps` at `tol=0` (not on the block), except for
    `ImplicitAdjoint`, whose backward solve stops on its own tolerance."""
    counts: dict[str, dict[int, dict[str, int]]] = {}

    def counted_fn(tally):
        def bump(name):
            def callback():
                tally[name] += 1

            return callback

        def raw(z, x):
            return jnp.tanh(0.5 * z + x)

        @jax.custom_vjp
        def fn(z, x):
            return raw(z, x)

        def fwd(z, x):
            jax.debug.callback(bump("f"))
            return raw(z, x), (z, x)

        def bwd(res, ct):
            jax.debug.callback(bump("b"))
            return jax.vjp(raw, *res)[1](ct)

        fn.defvjp(fwd, bwd)
        return fn

    for spec in ADJOINTS:
        if spec.name not in ("checkpoint",):
            continue
        counts[spec.name] = {}
        for n in steps:
            tally = {"f": 0, "b": 0}
            fn = counted_fn(tally)

            def loss(x):
                sol = rdeq.fixed_point(
                    fn,
                    jnp.zeros_like(x),
                    x,
                    solver=spec.solver(0.5),
                    adjoint=spec.adjoint,
                    max_steps=n,
                    tol=0.0,
                )
                return jnp.sum(sol.value)

            jax.block_until_ready(jax.jit(jax.grad(loss))(jnp.ones(3)))
            jax.effects_barrier()
            counts[spec.name][n] = dict(tally)
    return counts


def backward_evals(name: str, n: int, counted) -> str:
    """Backward-pass evaluations, `"<forward> f + <vjp> b"`."""
    if name.startswith("reversible"):
        return f"{2 * n}f+{2 * n}b"
    if name == "unrolled":
        return f"{2 * n + 1}b"
    if name == "checkpoint":
        c = counted["checkpoint"][n]
        return f"{c['f']}f+{c['b']}b"
    if name == "implicit":
        return "2f+<=31b"
    if name == "phantom":
        return "1b"
    raise ValueError(name)


# ---------------------------------------------------------------------------------------
# Interleaved timing.


def time_interleaved(
    programs: dict[str, tuple[Callable, tuple]],
    settings: Settings,
    rng: np.random.Generator,
    desc: str,
) -> dict[str, dict[str, Any]]:
    """Round-robin timing: every round times each program once (a sample of `inner`
    back-to-back calls, each waited for), in a fresh random order."""
    names = list(programs)
    inner = {}
    est = {}
    for name in names:  # warm up and calibrate
        fn, args = programs[name]
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        inner[name] = int(min(50, max(1, math.ceil(settings.min_sample_s / max(dt, 1e-6)))))
        est[name] = max(dt * inner[name], 1e-4)
    per_round = sum(est.values())
    rounds = int(
        max(
            settings.min_rounds,
            min(settings.max_rounds, settings.round_budget_s // per_round),
        )
    )
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in tqdm(range(rounds), desc=desc, leave=False):
        for i in rng.permutation(len(names)):
            name = names[i]
            fn, args = programs[name]
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                jax.block_until_ready(fn(*args))
            samples[name].append((time.perf_counter() - t0) / inner[name])
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
# One block.


def run_block(name: str, settings: Settings, key, bar, counted) -> dict[str, Any]:
    block_start = time.perf_counter()
    description, _, shape = blocks_lib.BLOCKS[name]
    kb, knchw = jax.random.split(key)
    block, xs, target = blocks_lib.make(name, settings.batch, key=kb)
    params, static = eqx.partition(block, eqx.is_inexact_array)
    num_params = sum(x.size for x in jtu.tree_leaves(params))

    programs: dict[str, tuple[Callable, tuple]] = {}
    rows: list[dict[str, Any]] = []
    bar.set_postfix_str(f"{name}: float64 unrolled reference")
    refs = reference_grads(params, static, xs, target, settings.beta, settings.steps)
    bar.update()
    for n, ref in zip(settings.steps, refs):
        for spec in ADJOINTS:
            bar.set_postfix_str(f"{name}: {spec.name}, {n} steps")
            loss = make_loss(static, target, spec.solver(settings.beta), spec.adjoint, n)
            t0 = time.perf_counter()
            compiled = jax.jit(grad_fn(loss)).lower(params, xs).compile()
            compile_s = time.perf_counter() - t0
            (_, nfe), grads = compiled(params, xs)
            err, err_leaf = rel_errors(to_numpy64(grads), ref)
            nfe = np.unique(np.asarray(nfe)).tolist()
            programs[f"{spec.name}/{n}"] = (compiled, (params, xs))
            rows.append(
                {
                    "adjoint": spec.name,
                    "label": spec.label,
                    "steps": n,
                    "memory": memory_of(compiled),
                    "grad_rel_err": err,
                    "grad_rel_err_worst_leaf": err_leaf,
                    "nfe": nfe[0] if len(nfe) == 1 else nfe,
                    "bwd_evals": backward_evals(spec.name, n, counted),
                    "compile_s": compile_s,
                }
            )
            bar.update()

    bar.set_postfix_str(f"{name}: reconstruction errors")
    recon = {}
    for spec in ADJOINTS:
        if spec.reversible:
            errs = reconstruction_errors(block, xs, spec.solver(settings.beta), settings.steps)
            recon[spec.name] = dict(zip(settings.steps, errs))
    for row in rows:
        errs = recon.get(row["adjoint"], {}).get(row["steps"], (None, None))
        row["recon_err"], row["recon_err_unbatched"] = errs
    bar.update()

    # Side experiment: the solve vmapped (per-example custom-VJP backward, per-example
    # parameter cotangents) against one solve of the whole batch with a batched `fn`.
    bar.set_postfix_str(f"{name}: vmap vs batched fn")
    side = {}
    side_adjoints = ("reversible", "unrolled") if settings.side_experiment else ()
    for adj in side_adjoints:
        spec = next(s for s in ADJOINTS if s.name == adj)
        loss = make_loss(
            static,
            target,
            spec.solver(settings.beta),
            spec.adjoint,
            settings.side_steps,
            batched_fn=True,
        )
        compiled = jax.jit(grad_fn(loss)).lower(params, xs).compile()
        compiled(params, xs)
        programs[f"batchedfn_{adj}/{settings.side_steps}"] = (compiled, (params, xs))
        side[adj] = {"memory": memory_of(compiled)}
    bar.update()

    bar.set_postfix_str(f"{name}: f and b")
    micro = micro_programs(block, xs, settings.chain, only=settings.micro)
    if name == "conv" and settings.conv_layouts:
        micro.update(conv_layout_programs(xs, settings.chain, knchw))
    programs.update(micro)
    bar.update()
    compile_phase_s = time.perf_counter() - block_start

    timings = time_interleaved(
        programs,
        settings,
        np.random.default_rng(settings.seed),
        desc=f"timing {name}",
    )
    for row in rows:
        row["time"] = timings[f"{row['adjoint']}/{row['steps']}"]
    for adj in side:
        side[adj]["time"] = timings[f"batchedfn_{adj}/{settings.side_steps}"]
    micro_t = {k: timings[k]["median_ms"] for k in micro}
    k = settings.chain
    get = lambda name: micro_t.get(name, math.nan)
    f = get("f_chain") / k
    f_loop = get("f_scan") / k
    costs = {
        "f_ms": f,
        "b_ms": get("fb_chain") / k - f,
        "b_per_example_ms": get("fb_pe_chain") / k - f,
        "f_single_ms": get("f_single"),
        "fb_single_ms": get("fb_single"),
        "f_in_scan_ms": f_loop,
        "b_in_scan_ms": get("fb_scan") / k - f_loop,
        "f_scan_over_straight": get("f_scan") / get("f_chain"),
        "fb_scan_over_straight": get("fb_scan") / get("fb_chain"),
        "raw_ms": micro_t,
        "chain": k,
    }
    if "nchw/f_chain" in micro_t:
        costs["conv_layouts"] = {
            layout: {
                "f_ms": get(f"{layout}/f_chain") / k,
                "f_in_scan_ms": get(f"{layout}/f_scan") / k,
                "fb_ms": get(f"{layout}/fb_chain") / k,
                "fb_in_scan_ms": get(f"{layout}/fb_scan") / k,
            }
            for layout in ("nchw",)
        }
    for adj in side:
        vm = next(r for r in rows if r["adjoint"] == adj and r["steps"] == settings.side_steps)
        side[adj]["vmap_time_ms"] = vm["time"]["median_ms"]
        side[adj]["vmap_temp_mib"] = vm["memory"]["temp_mib"]

    return {
        "description": description,
        "example_shape": list(shape),
        "batch": settings.batch,
        "num_params": int(num_params),
        "rows": rows,
        "costs": costs,
        "cost_model": cost_model(rows, costs, settings.steps),
        "vmap_vs_batched_fn": {"steps": settings.side_steps, **side} if side else None,
        "phase_s": {
            "compile_and_first_run": compile_phase_s,
            "timing": time.perf_counter() - block_start - compile_phase_s,
        },
    }


def cost_model(rows, costs, steps) -> list[dict[str, Any]]:
    """`(4f+2b)/(2f+2b)` x UnrolledAdjoint against the measured ReversibleAdjoint; also
    each adjoint's time against its pure evaluation cost ("floor"): reversible
    `(2N+1) f + 2N (f+b)`, unrolled `(2N+1) (f+b)`, from the straight-line f and b."""
    factor = lambda f, b: (4 * f + 2 * b) / (2 * f + 2 * b)
    f, b = costs["f_ms"], costs["b_ms"]
    model = factor(f, b)
    model_pe = factor(f, costs["b_per_example_ms"])
    model_loop = factor(costs["f_in_scan_ms"], costs["b_in_scan_ms"])
    t = {(r["adjoint"], r["steps"]): r["time"]["median_ms"] for r in rows}
    out = []
    for n in steps:
        unr = t[("unrolled", n)]
        floor_unr = (2 * n + 1) * (f + b)
        floor_rev = (2 * n + 1) * f + 2 * n * (f + b)
        for adj in ("reversible", "reversible_f64"):
            measured = t[(adj, n)]
            out.append(
                {
                    "adjoint": adj,
                    "steps": n,
                    "unrolled_ms": unr,
                    "measured_ms": measured,
                    "model_factor": model,
                    "predicted_ms": model * unr,
                    "measured_over_predicted": measured / (model * unr),
                    "model_factor_per_example_b": model_pe,
                    "measured_over_predicted_per_example_b": measured / (model_pe * unr),
                    "model_factor_in_loop": model_loop,
                    "measured_over_predicted_in_loop": measured / (model_loop * unr),
                    "floor_ms": floor_rev,
                    "measured_over_floor": measured / floor_rev,
                    "unrolled_floor_ms": floor_unr,
                    "unrolled_over_floor": unr / floor_unr,
                }
            )
    return out


# ---------------------------------------------------------------------------------------
# Reporting.


def fmt(x, spec=".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def fmt_err(x) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.1e}"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
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
        "jaxlib": getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
        "equinox": eqx.__version__,
        "revdeq_jax": rdeq.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def _span(values, fmt_spec=".2f") -> str:
    lo, hi = min(values), max(values)
    return (
        f"{lo:{fmt_spec}}"
        if f"{lo:{fmt_spec}}" == f"{hi:{fmt_spec}}"
        else (f"{lo:{fmt_spec}}–{hi:{fmt_spec}}")
    )


def summary_paragraph(data) -> list[str]:
    """'What this shows', one bullet per block, written from the numbers."""
    lines = []
    steps = data["settings"]["steps"]
    lo, hi = steps[0], steps[-1]
    for name, blk in data["blocks"].items():
        rows = {(r["adjoint"], r["steps"]): r for r in blk["rows"]}
        mem = lambda a, n: rows[(a, n)]["memory"]["temp_mib"]
        err = lambda a, n: rows[(a, n)]["grad_rel_err"]
        rec = lambda a, n: rows[(a, n)]["recon_err"]
        rec1 = lambda a, n: rows[(a, n)].get("recon_err_unbatched")
        c = blk["costs"]
        cms = [cm for cm in blk["cost_model"] if cm["adjoint"] == "reversible"]
        parts = []
        if hi > lo:
            grow = mem("reversible", hi) / mem("reversible", lo) - 1
            slope = (mem("unrolled", hi) - mem("unrolled", lo)) / (hi - lo)
            parts.append(
                f"*Memory*: ReversibleAdjoint {mem('reversible', lo):.2f} MiB at {lo} "
                f"steps and {mem('reversible', hi):.2f} MiB at {hi} ({grow:+.0%}; float64 "
                f"state {mem('reversible_f64', hi):.2f} MiB); UnrolledAdjoint "
                f"{mem('unrolled', lo):.2f} → {mem('unrolled', hi):.2f} MiB "
                f"({slope:+.2f} MiB per step); CheckpointAdjoint "
                f"{mem('checkpoint', lo):.2f} → {mem('checkpoint', hi):.2f} MiB."
            )
        ratio = [cm["measured_over_predicted"] for cm in cms]
        rev_floor = [cm["measured_over_floor"] for cm in cms]
        unr_floor = [cm["unrolled_over_floor"] for cm in cms]
        if all(0.87 <= r <= 1.15 for r in ratio):
            verdict = "within noise of the cost model"
        elif all(r < 1 for r in ratio):
            verdict = "faster than the cost model predicts"
        elif all(r > 1 for r in ratio):
            verdict = "slower than the cost model predicts"
        else:
            verdict = "on both sides of the cost model"
        ratio_loop = [cm["measured_over_predicted_in_loop"] for cm in cms]
        parts.append(
            f"*Time*: ReversibleAdjoint / UnrolledAdjoint = "
            f"{_span([cm['measured_ms'] / cm['unrolled_ms'] for cm in cms])} against "
            f"the model's {cms[0]['model_factor']:.2f} (f = {c['f_ms']:.3f} ms, b = "
            f"{c['b_ms']:.3f} ms): measured/predicted {_span(ratio)}, {verdict} "
            f"({_span(ratio_loop)} with f and b measured inside a loop body, model "
            f"{cms[0]['model_factor_in_loop']:.2f}). "
            f"Against their pure evaluation cost (straight-line f and b), "
            f"ReversibleAdjoint runs at {_span(rev_floor)}× and UnrolledAdjoint at "
            f"{_span(unr_floor)}×."
        )
        loop_f, loop_fb = c["f_scan_over_straight"], c["fb_scan_over_straight"]
        if max(loop_f, loop_fb) > 1.5:
            loop_text = "loop overhead is significant for this block"
        else:
            loop_text = "the loop itself is not what costs time here"
        parts.append(
            f"*Loops*: inside a `lax.scan` body an evaluation costs {loop_f:.2f}× and a "
            f"VJP {loop_fb:.2f}× their straight-line cost: {loop_text}."
        )
        if "conv_layouts" in c:
            cl = c["conv_layouts"]["nchw"]
            parts.append(
                "Written channels-first with `eqx.nn.Conv2d` instead, the block costs "
                f"{cl['f_in_scan_ms'] / cl['f_ms']:.1f}× (f) and "
                f"{cl['fb_in_scan_ms'] / cl['fb_ms']:.1f}× (f + b) inside a loop body."
            )
        parts.append(
            "*Gradient error* (vs float64 unrolled) by steps "
            f"{', '.join(map(str, steps))}: reversible float32 state "
            + ", ".join(fmt_err(err("reversible", n)) for n in steps)
            + "; float64 state "
            + ", ".join(fmt_err(err("reversible_f64", n)) for n in steps)
            + "; unrolled float32 "
            + ", ".join(fmt_err(err("unrolled", n)) for n in steps)
            + ". Reconstruction error, float32 / float64 state: "
            + ", ".join(
                f"{fmt_err(rec('reversible', n))} / {fmt_err(rec('reversible_f64', n))}"
                for n in steps
            )
            + "; the first example solved alone, without `vmap`: "
            + ", ".join(
                f"{fmt_err(rec1('reversible', n))} / {fmt_err(rec1('reversible_f64', n))}"
                for n in steps
            )
            + "."
        )
        overstated = [
            n
            for n in steps
            if (rec("reversible_f64", n) or 0) > 1e-3 and err("reversible_f64", n) < 1e-5
        ]
        if overstated:
            parts.append(
                "At " + ", ".join(map(str, overstated)) + " steps the reconstruction "
                "error is large while the gradient stays accurate: for this block the "
                "reconstruction error overstates the gradient error (presumably because "
                "the states it gets wrong are the early ones, whose cotangents the "
                "contraction has damped by the time the backward pass reaches them)."
            )
        side = blk.get("vmap_vs_batched_fn")
        if side:
            r = side["reversible"]
            u = side["unrolled"]
            parts.append(
                f"*vmap*: at {side['steps']} steps ReversibleAdjoint with the solve "
                f"`vmap`ped takes {r['vmap_time_ms']:.1f} ms and "
                f"{r['vmap_temp_mib']:.2f} MiB; one solve of the whole batch "
                f"(batched `fn`) {r['time']['median_ms']:.1f} ms and "
                f"{r['memory']['temp_mib']:.2f} MiB (UnrolledAdjoint: "
                f"{u['vmap_time_ms']:.1f} vs {u['time']['median_ms']:.1f} ms), so with "
                "one batched solve reversible / unrolled = "
                f"{r['time']['median_ms'] / u['time']['median_ms']:.2f} (model "
                f"{cms[0]['model_factor']:.2f})."
            )
        lines.append(f"- **{name}**. " + " ".join(parts))
    return lines


NOTES = """Reading the tables:

- Reversible and unrolled rows differentiate the same forward computation; checkpoint
  too. `ImplicitAdjoint` and `PhantomAdjoint` return approximations by design, so their
  error column measures how far they are from the exact gradient of the computation
  performed, not a bug. The implicit gradient is the gradient at the exact fixed point:
  it gets closer as the forward solve converges (more steps).
- Under `jax.vmap`, a custom-VJP backward (ReversibleAdjoint, and Equinox's checkpointed
  loop) is itself vmapped, so it accumulates one parameter cotangent per example in its
  loop carry and sums them at the end: memory `batch × parameters`, and per-example
  outer products instead of one matrix product per step. The vmap-vs-batched-`fn`
  table isolates that cost.
- Reconstruction error is in the units of the state (absolute, worst element); a value
  of 0 means the backward pass rebuilt exactly the forward iterates.
"""


def write_markdown(data, path: Path) -> None:
    s = data["settings"]
    m = data["meta"]
    out = [
        "# Adjoint benchmark",
        "",
        f"Generated by `python -m benchmarks.adjoints{' --quick' if s['quick'] else ''}`"
        f" on {m['date']}; the run took {m['wall_s'] / 60:.1f} min.",
        "",
        f"- Machine: {m['machine']['cpu']}, {m['machine']['cores']} cores, backend "
        f"`{m['machine']['backend']}`; load average (1, 5, 15 min) at start "
        f"{fmt_load(m['load_start'])}, at end {fmt_load(m['load_end'])}. The machine is "
        "shared: timing differences under ~15% are noise.",
        f"- JAX {m['machine']['jax']}, jaxlib {m['machine']['jaxlib']}, Equinox "
        f"{m['machine']['equinox']}, revdeq_jax {m['machine']['revdeq_jax']}, Python "
        f"{m['machine']['python']}.",
        f"- Batch {s['batch']} (`jax.vmap` over the solve), `Reversible(beta="
        f"{s['beta']})` forward for every adjoint, `tol=0` (every solve runs "
        "`max_steps` steps), loss = mean squared distance of the fixed point from a "
        "fixed random target; gradient w.r.t. all block parameters and the input.",
        "- **time**: median over interleaved rounds (every round times every "
        "configuration of the block once, in random order) of one jitted gradient step, "
        "compile excluded; **mem**: `memory_analysis().temp_size_in_bytes` of the "
        "compiled gradient in MiB (argument and output sizes, the same for every "
        "adjoint, are under each heading); **grad err**: ‖g − g_ref‖/‖g_ref‖ over all "
        "parameters and the input together, g_ref the gradient of the same computation "
        "unrolled in float64 (worst single leaf in the JSON); **recon**: "
        "`reconstruction_error(...)['abs']`, worst over the batch (solve `vmap`ped as "
        "in the gradient; the JSON also has the first example solved alone); "
        "**NFE**: `sol.nfe`; "
        "**bwd**: evaluations `f` and VJPs `b` on the backward pass (reversible, "
        "unrolled and phantom by construction, checkpoint counted at run time, implicit "
        "a bound: its backward solve stops at its own tolerance).",
        "",
        NOTES,
    ]
    for name, blk in data["blocks"].items():
        mem0 = blk["rows"][0]["memory"]
        out += [
            f"## {name}: {blk['description']}",
            "",
            f"{blk['num_params']} parameters, example shape {tuple(blk['example_shape'])}"
            f", batch {blk['batch']}; arguments {mem0['argument_mib']:.2f} MiB, outputs "
            f"{mem0['output_mib']:.2f} MiB.",
            "",
            "| steps | adjoint | time ms | mem MiB | grad err | recon | NFE | bwd |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in blk["rows"]:
            out.append(
                f"| {r['steps']} | {r['adjoint']} | {r['time']['median_ms']:.1f} | "
                f"{r['memory']['temp_mib']:.2f} | {fmt_err(r['grad_rel_err'])} | "
                f"{fmt_err(r['recon_err'])} | {r['nfe']} | {r['bwd_evals']} |"
            )
        c = blk["costs"]
        out += [
            "",
            "Per evaluation of the batched block (ms), measured as a chain of "
            f"{c['chain']} dependent evaluations in one jitted program, in straight-line "
            "code and as the body of a `lax.scan`; f + b is one VJP (value and pullback, "
            "as the backward pass takes it); 'per-example b' keeps one parameter "
            "cotangent per example (what a `vmap`ped custom-VJP backward computes); "
            "'one call' is a single jitted call, dispatch included.",
            "",
            "| | f | b | f + b | per-example b |",
            "|---|---:|---:|---:|---:|",
            f"| straight-line | {c['f_ms']:.3f} | {c['b_ms']:.3f} | "
            f"{c['f_ms'] + c['b_ms']:.3f} | {fmt(c['b_per_example_ms'], '.3f')} |",
            f"| `lax.scan` body | {c['f_in_scan_ms']:.3f} | {c['b_in_scan_ms']:.3f} | "
            f"{c['f_in_scan_ms'] + c['b_in_scan_ms']:.3f} | – |",
            f"| one call | {fmt(c['f_single_ms'], '.3f')} | – | "
            f"{fmt(c['fb_single_ms'], '.3f')} | – |",
        ]
        if "conv_layouts" in c:
            out += [
                "",
                "The same conv block written differently (ms per evaluation):",
                "",
                "| convolution | f | f in scan | f + b | f + b in scan |",
                "|---|---:|---:|---:|---:|",
                f"| lax.conv, NHWC (used above) | {c['f_ms']:.3f} | "
                f"{c['f_in_scan_ms']:.3f} | {c['f_ms'] + c['b_ms']:.3f} | "
                f"{c['f_in_scan_ms'] + c['b_in_scan_ms']:.3f} |",
            ]
            for layout, label in (("nchw", "lax.conv, NCHW (eqx.nn.Conv2d)"),):
                d = c["conv_layouts"][layout]
                out.append(
                    f"| {label} | {d['f_ms']:.3f} | {d['f_in_scan_ms']:.3f} | "
                    f"{d['fb_ms']:.3f} | {d['fb_in_scan_ms']:.3f} |"
                )
        cm0 = blk["cost_model"][0]
        out += [
            "",
            "Cost model: ReversibleAdjoint ≈ (4f+2b)/(2f+2b) × UnrolledAdjoint. Factor "
            f"{cm0['model_factor']:.2f} from straight-line f and b (the model asked "
            f"for), {cm0['model_factor_in_loop']:.2f} from f and b inside a loop body, "
            f"{fmt(cm0['model_factor_per_example_b'], '.2f')} with per-example b. Floor "
            "= pure evaluation cost from straight-line f and b: reversible (2N+1)f + "
            "2N(f+b), unrolled (2N+1)(f+b).",
            "",
            "| steps | adjoint | unrolled ms | measured ms | measured / unrolled | "
            "÷ model | ÷ in-loop model | ÷ per-example model | measured / floor | "
            "unrolled / floor |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for cm in blk["cost_model"]:
            out.append(
                f"| {cm['steps']} | {cm['adjoint']} | {cm['unrolled_ms']:.1f} | "
                f"{cm['measured_ms']:.1f} | "
                f"{cm['measured_ms'] / cm['unrolled_ms']:.2f} | "
                f"{cm['measured_over_predicted']:.2f} | "
                f"{cm['measured_over_predicted_in_loop']:.2f} | "
                f"{fmt(cm['measured_over_predicted_per_example_b'], '.2f')} | "
                f"{cm['measured_over_floor']:.2f} | {cm['unrolled_over_floor']:.2f} |"
            )
        side = blk.get("vmap_vs_batched_fn")
        if side:
            out += [
                "",
                "The solve `vmap`ped per example (as above) vs one solve of the whole "
                f"batch with a batched `fn` ({side['steps']} steps):",
                "",
                "| adjoint | vmap ms | vmap MiB | batched fn ms | batched fn MiB |",
                "|---|---:|---:|---:|---:|",
            ]
            for adj in ("reversible", "unrolled"):
                d = side[adj]
                out.append(
                    f"| {adj} | {d['vmap_time_ms']:.1f} | {d['vmap_temp_mib']:.2f} | "
                    f"{d['time']['median_ms']:.1f} | {d['memory']['temp_mib']:.2f} |"
                )
        ph = blk["phase_s"]
        out += [
            "",
            f"Block wall time: {ph['compile_and_first_run']:.0f} s compiling and "
            f"checking, {ph['timing']:.0f} s timing "
            f"({blk['rows'][0]['time']['rounds']} rounds).",
            "",
        ]
    out += ["## What this shows", "", *summary_paragraph(data), ""]
    path.write_text("\n".join(out))


def fmt_load(load) -> str:
    return "n/a" if load is None else ", ".join(f"{x:.1f}" for x in load)


def plot(data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(data["blocks"])
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 4 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        rows = data["blocks"][name]["rows"]
        for spec in ADJOINTS:
            rs = sorted((r for r in rows if r["adjoint"] == spec.name), key=lambda r: r["steps"])
            n = [r["steps"] for r in rs]
            kw = dict(marker="o", label=spec.label)
            axes[i, 0].plot(n, [max(r["memory"]["temp_mib"], 1e-3) for r in rs], **kw)
            axes[i, 1].plot(n, [r["time"]["median_ms"] for r in rs], **kw)
            errs = [r["grad_rel_err"] for r in rs]
            errs = [max(e, 1e-17) if math.isfinite(e) else np.nan for e in errs]
            axes[i, 2].plot(n, errs, **kw)
        for j, (title, unit) in enumerate(
            [
                ("compiled temp memory", "MiB"),
                ("gradient step time (median)", "ms"),
                ("gradient rel. error vs float64 unrolled", ""),
            ]
        ):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.set_title(f"{name}: {title}")
            ax.set_xlabel("max_steps")
            if unit:
                ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
    steps = data["settings"]["steps"]
    for ax in axes.flat:
        ax.set_xticks(steps)
        ax.set_xticklabels([str(n) for n in steps])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if isinstance(x, np.integer):
        return int(x)
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


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--blocks", nargs="+", choices=list(blocks_lib.BLOCKS), default=None)
    parser.add_argument(
        "--steps", nargs="+", type=int, default=None, help="override max_steps values"
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only rewrite adjoints.md and adjoints.png from an existing adjoints.json",
    )
    args = parser.parse_args(argv)
    if args.replot:
        data = from_json(json.loads((args.out / "adjoints.json").read_text()))
        write_markdown(data, args.out / "adjoints.md")
        plot(data, args.out / "adjoints.png")
        return data
    settings = QUICK if args.quick else Settings()
    if args.blocks:
        settings = dataclasses.replace(settings, blocks=tuple(args.blocks))
    if args.steps:
        settings = dataclasses.replace(
            settings, steps=tuple(args.steps), side_steps=max(args.steps)
        )
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_start": machine_info()["loadavg"],
    }
    counted = count_backward_evals(settings.steps)
    per_block = len(settings.steps) * len(ADJOINTS) + 4
    keys = jax.random.split(jax.random.key(settings.seed), len(settings.blocks))
    results = {}
    with tqdm(total=per_block * len(settings.blocks), desc="configurations") as bar:
        for name, key in zip(settings.blocks, keys):
            results[name] = run_block(name, settings, key, bar, counted)
    meta["wall_s"] = time.perf_counter() - start
    meta["load_end"] = machine_info()["loadavg"]
    data = {
        "meta": meta,
        "settings": {**dataclasses.asdict(settings), "quick": args.quick},
        "adjoints": {s.name: s.label for s in ADJOINTS},
        "backward_eval_counts": counted,
        "blocks": results,
    }
    (args.out / "adjoints.json").write_text(json.dumps(jsonable(data), indent=1))
    write_markdown(data, args.out / "adjoints.md")
    plot(data, args.out / "adjoints.png")
    print(f"wrote {args.out}/adjoints.{{md,json,png}} in {meta['wall_s'] / 60:.1f} min")
    return data


if __name__ == "__main__":
    main()
