"""Adjoint comparison: time, compiled memory and gradient error of one jitted gradient step.

    python -m benchmarks.adjoints [--quick] [--out benchmarks/results]

For three equilibrium blocks (the library's `nn.EquilibriumTransformerLayer` and
`nn.ConvResidualLayer`, and a contractive MLP; `benchmarks/blocks.py`),
batched with `jax.vmap`, at several `max_steps` (`tol=0`, so every solve runs all its
steps), and for each way of differentiating the solve, it measures

* the median wall time of one jitted gradient step, timed interleaved: every round times
  every configuration of the block once, in a fresh random order (these machines are
  shared and noisy, so slow drifts hit all configurations alike), compile excluded;
* compiled memory, `jax.jit(grad).lower(...).compile().memory_analysis()`;
* the relative error of the gradient (parameters and input) against the gradient of the
  same computation unrolled in float64 (`UnrolledAdjoint`, block cast to float64, inside
  `jax.enable_x64(True)`);
* for the reversible configurations, the deviation of the rebuilt initial state reported
  by the gradient's own backward pass (`ReversibleAdjoint(report=...)`);
* forward evaluations (`sol.nfe`) and backward evaluations;

plus, in the same interleaved rounds, the cost `f` of one batched evaluation of the block
and `b` of one VJP of it, for the cost model `(4f + 2b) / (2f + 2b)` of
`ReversibleAdjoint` relative to `UnrolledAdjoint`; the same costs inside a `lax.scan`
body (loop overhead); and, at one step
count, the solve `vmap`ped per example against one solve of the whole batch.

Writes `adjoints.md`, `adjoints.json` and `adjoints.png` into `--out`;
`--replot` rewrites the first and last from the JSON. `--quick` runs two step counts,
fewer rounds and no side measurements. Compiling ~100 programs is most of the run time.
"""

import dataclasses
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

from . import _harness as h, blocks as blocks_lib


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: tuple[int, ...] = (4, 8, 16, 32, 64)
    blocks: tuple[str, ...] = ("attention", "conv", "mlp")
    batch: int = 8
    beta: float = 0.5
    timing: h.Timing = h.Timing()  # interleaved rounds per block
    chain: int = 8  # evaluations per measurement of f and b
    side_steps: int = 16  # steps of the vmap-vs-batched-fn side experiment
    side_experiment: bool = True
    micro: tuple[str, ...] | None = None  # which f/b programs (None: all)
    seed: int = 0


QUICK = Settings(
    steps=(4, 16),
    timing=h.QUICK_TIMING,
    side_experiment=False,
    micro=("f_chain", "fb_chain", "f_scan", "fb_scan"),
)


@dataclasses.dataclass(frozen=True)
class AdjointSpec:
    name: str
    label: str
    solver: Callable[[float], rdeq.AbstractSolver]
    adjoint: rdeq.AbstractAdjoint
    reversible: bool  # its backward pass reports its reconstruction


def _float32(beta):
    return rdeq.Reversible(beta, state_dtype=jnp.float32)


# The losses sum the vmapped solves before `grad`: the batch rule's summed parameter
# cotangents are the gradient (see `ReversibleAdjoint(vmap_backward=...)`).
SUMMED = rdeq.ReversibleAdjoint(vmap_backward="batch")

# Every adjoint differentiates the same forward iteration with a float32 state, except the
# reversible rows with another state. The reversible rows' adjoint is replaced by one
# that records the backward pass's report and never raises (`harness.Reports`).
ADJOINTS = (
    AdjointSpec(
        "reversible",
        "ReversibleAdjoint (f32 state)",
        _float32,
        SUMMED,
        True,
    ),
    AdjointSpec(
        "reversible_f64",
        "ReversibleAdjoint (f64 state)",
        lambda beta: rdeq.Reversible(beta, state_dtype=jnp.float64),
        SUMMED,
        True,
    ),
    AdjointSpec(
        "reversible_exact",
        "ReversibleAdjoint (exact state, the default)",
        lambda beta: rdeq.Reversible(beta, state_dtype=rdeq.ExactState()),
        SUMMED,
        True,
    ),
    AdjointSpec(
        "unrolled",
        "UnrolledAdjoint",
        _float32,
        rdeq.UnrolledAdjoint(),
        False,
    ),
    AdjointSpec(
        "checkpoint",
        "CheckpointAdjoint",
        _float32,
        rdeq.CheckpointAdjoint(),
        False,
    ),
    AdjointSpec(
        "implicit",
        "ImplicitAdjoint (Anderson bwd, tol 1e-6, <=30)",
        _float32,
        rdeq.ImplicitAdjoint(),
        False,
    ),
    AdjointSpec(
        "phantom",
        "PhantomAdjoint (JFB, 1 step)",
        _float32,
        rdeq.PhantomAdjoint(),
        False,
    ),
)


# ---------------------------------------------------------------------------------------
# The programs that are measured.


def make_loss(static, target, solver, adjoint, steps: int, *, batched_fn: bool = False):
    """`loss(params, xs) -> (loss, nfe)`: mean squared distance of the fixed point from a
    fixed target. The solve is `jax.vmap`ped over the batch (each example its own solve),
    or with `batched_fn=True` run once on the whole batch with a batched `fn`."""

    def loss(params, xs):
        block = eqx.combine(params, static)
        if batched_fn:
            fn = h.Batched(block)
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


def reference_grads(params, static, xs, target, beta: float, steps: tuple[int, ...]):
    """Gradients of the unrolled computation in float64 (block, input and state), one
    per step count, from one compiled program."""
    with jax.enable_x64(True):
        p64 = h.cast_floats(params, jnp.float64)
        x64 = xs.astype(jnp.float64)
        t64 = target.astype(jnp.float64)

        def all_grads(p, x):
            out = []
            for n in steps:
                loss = make_loss(static, t64, rdeq.Reversible(beta), rdeq.UnrolledAdjoint(), n)
                out.append(grad_fn(loss)(p, x)[1])
            return out

        return [h.to_numpy64(g) for g in jax.jit(all_grads)(p64, x64)]


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
# One block.


def run_block(name: str, settings: Settings, key, bar, counted) -> dict[str, Any]:
    block_start = time.perf_counter()
    description, _, shape = blocks_lib.BLOCKS[name]
    block, xs, target = blocks_lib.make(name, settings.batch, key=key)
    params, static = eqx.partition(block, eqx.is_inexact_array)
    reports = h.Reports()

    programs: dict[str, tuple[Callable, tuple]] = {}
    rows: list[dict[str, Any]] = []
    bar.set_postfix_str(f"{name}: float64 unrolled reference")
    refs = reference_grads(params, static, xs, target, settings.beta, settings.steps)
    bar.update()
    for n, ref in zip(settings.steps, refs):
        for spec in ADJOINTS:
            bar.set_postfix_str(f"{name}: {spec.name}, {n} steps")
            tag = f"{spec.name}/{n}"
            adjoint = reports.adjoint(tag) if spec.reversible else spec.adjoint
            loss = make_loss(static, target, spec.solver(settings.beta), adjoint, n)
            t0 = time.perf_counter()
            compiled = jax.jit(grad_fn(loss)).lower(params, xs).compile()
            compile_s = time.perf_counter() - t0
            (_, nfe), grads = compiled(params, xs)
            err = h.rel_error(h.to_numpy64(grads), ref)
            report = reports.take(tag) if spec.reversible else None
            nfe = np.unique(np.asarray(nfe)).tolist()
            programs[f"{spec.name}/{n}"] = (compiled, (params, xs))
            rows.append(
                {
                    "adjoint": spec.name,
                    "label": spec.label,
                    "steps": n,
                    "memory": h.memory_of(compiled),
                    "grad_rel_err": err["global"],
                    "grad_rel_err_worst_leaf": err["worst_leaf"],
                    "recon_err": None if report is None else report["abs"],
                    "recon_mismatch": None if report is None else report["mismatch"],
                    "drift": None if report is None else report["drift"],
                    "nfe": nfe[0] if len(nfe) == 1 else nfe,
                    "bwd_evals": backward_evals(spec.name, n, counted),
                    "compile_s": compile_s,
                }
            )
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
            reports.adjoint(f"batchedfn_{adj}") if spec.reversible else spec.adjoint,
            settings.side_steps,
            batched_fn=True,
        )
        compiled = jax.jit(grad_fn(loss)).lower(params, xs).compile()
        compiled(params, xs)
        programs[f"batchedfn_{adj}/{settings.side_steps}"] = (compiled, (params, xs))
        side[adj] = {"memory": h.memory_of(compiled)}
    bar.update()

    bar.set_postfix_str(f"{name}: f and b")
    micro = micro_programs(block, xs, settings.chain, only=settings.micro)
    programs.update(micro)
    bar.update()
    compile_phase_s = time.perf_counter() - block_start

    timings = h.time_interleaved(
        programs, settings.timing, seed=settings.seed, desc=f"timing {name}"
    )
    reports.clear()  # the timed calls reported too
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
    for adj in side:
        vm = next(r for r in rows if r["adjoint"] == adj and r["steps"] == settings.side_steps)
        side[adj]["vmap_time_ms"] = vm["time"]["median_ms"]
        side[adj]["vmap_temp_mib"] = vm["memory"]["temp_mib"]

    return {
        "description": description,
        "example_shape": list(shape),
        "batch": settings.batch,
        "num_params": h.num_params(block),
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
        for adj in ("reversible", "reversible_f64", "reversible_exact"):
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
        c = blk["costs"]
        cms = [cm for cm in blk["cost_model"] if cm["adjoint"] == "reversible"]
        parts = []
        if hi > lo:
            grow = mem("reversible", hi) / mem("reversible", lo) - 1
            slope = (mem("unrolled", hi) - mem("unrolled", lo)) / (hi - lo)
            parts.append(
                f"*Memory*: ReversibleAdjoint {mem('reversible', lo):.2f} MiB at {lo} "
                f"steps and {mem('reversible', hi):.2f} MiB at {hi} ({grow:+.0%}; float64 "
                f"state {mem('reversible_f64', hi):.2f} MiB; exact state "
                f"{mem('reversible_exact', lo):.2f} → {mem('reversible_exact', hi):.2f} MiB, "
                "its information buffer growing with the steps); UnrolledAdjoint "
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
            f"{h.span([cm['measured_ms'] / cm['unrolled_ms'] for cm in cms])} against "
            f"the model's {cms[0]['model_factor']:.2f} (f = {c['f_ms']:.3f} ms, b = "
            f"{c['b_ms']:.3f} ms): measured/predicted {h.span(ratio)}, {verdict} "
            f"({h.span(ratio_loop)} with f and b measured inside a loop body, model "
            f"{cms[0]['model_factor_in_loop']:.2f}). "
            f"Against their pure evaluation cost (straight-line f and b), "
            f"ReversibleAdjoint runs at {h.span(rev_floor)}× and UnrolledAdjoint at "
            f"{h.span(unr_floor)}×."
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
        parts.append(
            "*Gradient error* (vs float64 unrolled) by steps "
            f"{', '.join(map(str, steps))}: reversible float32 state "
            + ", ".join(h.fmt_err(err("reversible", n)) for n in steps)
            + "; float64 state "
            + ", ".join(h.fmt_err(err("reversible_f64", n)) for n in steps)
            + "; exact state "
            + ", ".join(h.fmt_err(err("reversible_exact", n)) for n in steps)
            + "; unrolled float32 "
            + ", ".join(h.fmt_err(err("unrolled", n)) for n in steps)
            + ". Reconstruction error reported by the backward pass, float32 / float64 / "
            "exact state: "
            + ", ".join(" / ".join(h.fmt_err(rec(a, n)) for a in REVERSIBLE) for n in steps)
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


REVERSIBLE = tuple(s.name for s in ADJOINTS if s.reversible)


NOTES = """Reading the tables:

- Reversible and unrolled rows differentiate the same forward computation; checkpoint
  too. `ImplicitAdjoint` and `PhantomAdjoint` return approximations by design, so their
  error column measures how far they are from the exact gradient of the computation
  performed, not a bug. The implicit gradient is the gradient at the exact fixed point:
  it gets closer as the forward solve converges (more steps).
- Under `jax.vmap`, ReversibleAdjoint's backward walks the batch back in one loop (its
  `custom_vmap` rule, `vmap_backward="batch"`), evaluating `fn` as the VJP of the batched
  function, so it keeps one parameter cotangent, as a batched `fn` would. Equinox's
  checkpointed loop (CheckpointAdjoint) has no such rule: vmapped, it accumulates one
  parameter cotangent per example (memory `batch × parameters`). The
  vmap-vs-batched-`fn` table compares the two layouts; `batch_memory.md` measures the
  rule on the experiments' models.
- Reconstruction error is in the units of the state (absolute, worst element); a value
  of 0 means the backward pass rebuilt exactly the forward iterates.
"""


def fmt_recon(row) -> str:
    if row.get("recon_err") is None:
        return "–"
    return h.fmt_err(row["recon_err"]) + (" ✗" if row["recon_mismatch"] else "")


def write_markdown(data, path: Path) -> None:
    s = data["settings"]
    out = [
        "# Adjoint benchmark",
        "",
        *h.provenance(data, "adjoints"),
        f"- Batch {s['batch']} (`jax.vmap` over the solve), `Reversible(beta="
        f"{s['beta']}, state_dtype=jnp.float32)` forward for every adjoint (the "
        "reversible rows with a float64 and the exact state aside), `tol=0` (every solve runs "
        "`max_steps` steps), loss = mean squared distance of the fixed point from a "
        "fixed random target; gradient w.r.t. all block parameters and the input.",
        "- **time**: median over interleaved rounds (every round times every "
        "configuration of the block once, in random order) of one jitted gradient step, "
        "compile excluded; **mem**: `memory_analysis().temp_size_in_bytes` of the "
        "compiled gradient in MiB (argument and output sizes, the same for every "
        "adjoint, are under each heading); **grad err**: ‖g − g_ref‖/‖g_ref‖ over all "
        "parameters and the input together, g_ref the gradient of the same computation "
        "unrolled in float64 (worst single leaf in the JSON); **recon**: "
        "the deviation of the rebuilt initial state that the gradient's own backward pass "
        "reported (`ReversibleAdjoint(report=...)`, absolute, worst over the batch; ✗ "
        "where it flagged a mismatch; reversible rows use `on_mismatch='ignore'`); "
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
                f"{r['memory']['temp_mib']:.2f} | {h.fmt_err(r['grad_rel_err'])} | "
                f"{fmt_recon(r)} | {r['nfe']} | {r['bwd_evals']} |"
            )
        c = blk["costs"]
        out += [
            "",
            "Per evaluation of the batched block (ms), measured as a chain of "
            f"{c['chain']} dependent evaluations in one jitted program, in straight-line "
            "code and as the body of a `lax.scan`; f + b is one VJP (value and pullback, "
            "as the backward pass takes it); 'per-example b' keeps one parameter "
            "cotangent per example (what a `vmap`ped custom-VJP backward without a "
            "batching rule computes); "
            "'one call' is a single jitted call, dispatch included.",
            "",
            "| | f | b | f + b | per-example b |",
            "|---|---:|---:|---:|---:|",
            f"| straight-line | {c['f_ms']:.3f} | {c['b_ms']:.3f} | "
            f"{c['f_ms'] + c['b_ms']:.3f} | {h.fmt(c['b_per_example_ms'], '.3f')} |",
            f"| `lax.scan` body | {c['f_in_scan_ms']:.3f} | {c['b_in_scan_ms']:.3f} | "
            f"{c['f_in_scan_ms'] + c['b_in_scan_ms']:.3f} | – |",
            f"| one call | {h.fmt(c['f_single_ms'], '.3f')} | – | "
            f"{h.fmt(c['fb_single_ms'], '.3f')} | – |",
        ]
        cm0 = blk["cost_model"][0]
        out += [
            "",
            "Cost model: ReversibleAdjoint ≈ (4f+2b)/(2f+2b) × UnrolledAdjoint. Factor "
            f"{cm0['model_factor']:.2f} from straight-line f and b (the model asked "
            f"for), {cm0['model_factor_in_loop']:.2f} from f and b inside a loop body, "
            f"{h.fmt(cm0['model_factor_per_example_b'], '.2f')} with per-example b. Floor "
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
                f"{h.fmt(cm['measured_over_predicted_per_example_b'], '.2f')} | "
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


def run(args) -> dict[str, Any]:
    settings = h.choose_settings(args, Settings(), QUICK)
    if args.steps:
        settings = dataclasses.replace(
            settings, steps=tuple(args.steps), side_steps=max(args.steps)
        )
    counted = count_backward_evals(settings.steps)
    per_block = len(settings.steps) * len(ADJOINTS) + 3
    keys = jax.random.split(jax.random.key(settings.seed), len(settings.blocks))
    results = {}
    with tqdm(total=per_block * len(settings.blocks), desc="configurations") as bar:
        for name, key in zip(settings.blocks, keys):
            results[name] = run_block(name, settings, key, bar, counted)
    return {
        "settings": {**dataclasses.asdict(settings), "quick": args.quick},
        "adjoints": {s.name: s.label for s in ADJOINTS},
        "backward_eval_counts": counted,
        "blocks": results,
    }


def add_arguments(parser) -> None:
    parser.add_argument("--blocks", nargs="+", choices=list(blocks_lib.BLOCKS), default=None)
    parser.add_argument(
        "--steps", nargs="+", type=int, default=None, help="override max_steps values"
    )


def main(argv=None) -> dict[str, Any]:
    return h.cli(
        "adjoints", __doc__, run, write_markdown, plot, argv=argv, add_arguments=add_arguments
    )


if __name__ == "__main__":
    main()
