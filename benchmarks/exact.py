"""Cost of the exact state's lattice: `ExactState()` against the previous exact state
`ExactState(guard_bits=0)`, at 64 steps.

    python -m benchmarks.exact [--quick] [--out benchmarks/results]

`ExactState()` rounds `fn`'s output to a lattice and stores 6 guard bits per element and
evaluation beside each division remainder, so that the backward pass can snap a
re-evaluation of `fn` that is off by up to 31.5 ulps back onto the forward's value.
`ExactState(guard_bits=0)` stores the remainders only and needs bit-identical
re-evaluations. Issue 9 asks the new state to stay within 1.3x the time and 1.5x the
memory of the previous one at 64 steps on the benchmark blocks.

For each block of `benchmarks/blocks.py` (attention, conv, MLP), each `beta` in 0.5,
0.8, 0.9, and two layouts of a batch of 8 (`batched`: one solve of the whole batch with
the block `vmap`ped inside `fn`; `vmap`: the solve `jax.vmap`ped per example), it
compiles one jitted value-and-grad step (mean squared distance of the fixed point from a
fixed target, `ReversibleAdjoint(on_mismatch="ignore")`, `tol=0`) per state and measures

* the median time, timed interleaved (every round times every program of the block once,
  in random order), and the new / old ratio from the same rounds;
* compiled temp memory and its ratio;
* to explain the memory: the information buffer the state needs (2 x `ceil(steps / d)`
  uint32 words per state element, `d` digits per word) and the number of full copies of
  the buffer the compiled program makes (`copy` instructions in `compile().as_text()`).

Writes `exact.{md,json,png}`. `--quick`: the `batched` layout only, fewer rounds.
"""

import dataclasses
import math
import re
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import revdeq_jax as rdeq

from . import _harness as h, blocks as blocks_lib


STATES = {
    "exact": rdeq.ExactState(),
    "exact-m4": rdeq.ExactState(guard_bits=4),
    # The default's tolerance (30 vs 31.5 ulps) at the memory of 4 guard bits, for a lattice
    # 4x coarser: what `fn`'s output is rounded to, measured by the gradient difference.
    "exact-k2m4": rdeq.ExactState(lattice_bits=2, guard_bits=4),
    "exact-nolattice": rdeq.ExactState(guard_bits=0),
}
NEW, M4, K2M4, OLD = STATES
GOAL = {"time": 1.3, "memory": 1.5}  # issue 9


@dataclasses.dataclass(frozen=True)
class Settings:
    blocks: tuple[str, ...] = ("attention", "conv", "mlp")
    betas: tuple[float, ...] = (0.5, 0.8, 0.9)
    layouts: tuple[str, ...] = ("batched", "vmap")
    steps: int = 64
    batch: int = 8
    timing: h.Timing = h.Timing(max_rounds=7, round_budget_s=60.0)
    seed: int = 0


QUICK = Settings(layouts=("batched",), timing=h.QUICK_TIMING)


class _Mismatches:
    """`report` hook: counts the solves whose backward pass did not rebuild `z0`."""

    def __init__(self):
        self.count = 0

    def __call__(self, report):
        self.count += int(np.sum(np.asarray(report["mismatch"])))


def make_value_and_grad(static, target, state, beta: float, steps: int, layout: str, report=None):
    solver = rdeq.Reversible(beta, state_dtype=state)
    # The loss sums the examples' solves before `grad`: the batch rule applies.
    adjoint = rdeq.ReversibleAdjoint(on_mismatch="ignore", report=report, vmap_backward="batch")

    def solve(fn, x):
        return rdeq.fixed_point(
            fn, jnp.zeros_like(x), x, solver=solver, adjoint=adjoint, max_steps=steps, tol=0.0
        ).value

    def loss(params, xs):
        block = eqx.combine(params, static)
        if layout == "batched":
            value = solve(h.Batched(block), xs)
        else:
            value = jax.vmap(lambda x: solve(block, x))(xs)
        return 0.5 * jnp.mean(jnp.square(value - target))

    return jax.value_and_grad(loss, argnums=(0, 1))


_U32 = re.compile(r"= u32\[([0-9,]*)\]\{[0-9,]*\} copy\(")


def buffer_copies(hlo: str, buffer_elements: int) -> int:
    """`copy` instructions in the compiled HLO whose result is a uint32 array of exactly
    the size of one of the two information buffers (y's or z's)."""
    n = 0
    for dims in _U32.findall(hlo):
        if math.prod(int(d) for d in dims.split(",") if d) == buffer_elements:
            n += 1
    return n


def run_block(name: str, settings: Settings, key, bar) -> dict[str, Any]:
    start = time.perf_counter()
    description, _, shape = blocks_lib.BLOCKS[name]
    block, xs, target = blocks_lib.make(name, settings.batch, key=key)
    params, static = eqx.partition(block, eqx.is_inexact_array)
    elements = xs.size
    compiler = h.Compiler()
    programs, rows, grads = {}, [], {}
    for layout in settings.layouts:
        for beta in settings.betas:
            for s, state in STATES.items():
                bar.set_postfix_str(f"{name}: {layout}, β={beta}, {s}")
                mismatches = _Mismatches()
                step = make_value_and_grad(
                    static, target, state, beta, settings.steps, layout, mismatches
                )
                compiled = compiler(f"{layout}, β={beta}, {s}", step, params, xs)
                grads[(layout, beta, s)] = h.to_numpy64(compiled(params, xs)[1])
                jax.effects_barrier()
                failed = mismatches.count
                programs[f"{layout}/{beta}/{s}"] = (compiled, (params, xs))
                words = math.ceil(settings.steps / state.digits_per_word(beta))
                hlo = compiled.as_text()
                rows.append(
                    {
                        "layout": layout,
                        "beta": beta,
                        "state": s,
                        "memory": h.memory_of(compiled),
                        "buffer_bits_per_step": state.buffer_bits_per_step(beta),
                        "buffer_words": words,
                        "buffer_mib": 2 * words * elements * 4 / h.MiB,
                        "buffer_copies": buffer_copies(hlo, words * elements),
                        "copies": hlo.count(" copy("),
                        "mismatches": failed,
                    }
                )
                bar.update()
    compile_s = time.perf_counter() - start
    bar.set_postfix_str(f"{name}: timing")
    t = h.time_interleaved(programs, settings.timing, seed=settings.seed, desc=f"timing {name}")
    for r in rows:
        r["time"] = t[f"{r['layout']}/{r['beta']}/{r['state']}"]
    bar.update()
    ratios = []
    for layout in settings.layouts:
        for beta in settings.betas:
            new, m4, k2m4, old = (
                next(r for r in rows if (r["layout"], r["beta"], r["state"]) == (layout, beta, s))
                for s in (NEW, M4, K2M4, OLD)
            )
            diff = h.rel_error(grads[(layout, beta, NEW)], grads[(layout, beta, OLD)])
            k2m4_diff = h.rel_error(grads[(layout, beta, K2M4)], grads[(layout, beta, OLD)])
            extra_temp = new["memory"]["temp_mib"] - old["memory"]["temp_mib"]
            extra_buffer = new["buffer_mib"] - old["buffer_mib"]
            ratios.append(
                {
                    "layout": layout,
                    "beta": beta,
                    "time_ratio": new["time"]["median_ms"] / old["time"]["median_ms"],
                    "temp_ratio": new["memory"]["temp_mib"] / old["memory"]["temp_mib"],
                    "m4_temp_ratio": m4["memory"]["temp_mib"] / old["memory"]["temp_mib"],
                    "k2m4_temp_ratio": k2m4["memory"]["temp_mib"] / old["memory"]["temp_mib"],
                    "k2m4_grad_rel_diff": k2m4_diff["worst_leaf"],
                    "extra_temp_mib": extra_temp,
                    "extra_buffer_mib": extra_buffer,
                    "extra_temp_per_extra_buffer": extra_temp / extra_buffer,
                    "grad_rel_diff": diff["worst_leaf"],
                }
            )
    return {
        "description": description,
        "example_shape": list(shape),
        "state_elements": elements,
        "num_params": h.num_params(block),
        "rows": rows,
        "ratios": ratios,
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - start,
    }


def run(args) -> dict[str, Any]:
    settings = h.choose_settings(args, Settings(), QUICK)
    keys = jax.random.split(jax.random.key(settings.seed), len(settings.blocks))
    per_block = len(settings.layouts) * len(settings.betas) * len(STATES) + 1
    results = {}
    with tqdm(total=per_block * len(settings.blocks), desc="exact") as bar:
        for name, key in zip(settings.blocks, keys):
            results[name] = run_block(name, settings, key, bar)
    return {
        "settings": {**dataclasses.asdict(settings), "quick": args.quick},
        "tolerance_ulps": {s: st.tolerance_ulps() for s, st in STATES.items()},
        "blocks": results,
    }


# ---------------------------------------------------------------------------------------
# Reporting.


def write_markdown(data, path) -> None:
    s = data["settings"]
    out = [
        "# Exact state: the lattice's cost",
        "",
        *h.provenance(data, "exact"),
        "- `exact` = `ExactState()` (6 guard bits on a 1-ulp lattice, refined in the same "
        "buffer to 7, 8, 7 guard bits on a 1/2, 1/4, 1/2-ulp lattice at β = 0.5, 0.8, 0.9: "
        "exact whenever the backward pass re-evaluates `fn` within at least "
        f"{data['tolerance_ulps'][NEW]:g} ulps); "
        f"`exact-m4` = `ExactState(guard_bits=4)` ({data['tolerance_ulps'][M4]:g} ulps, "
        "the first default); `exact-k2m4` = `ExactState(lattice_bits=2, guard_bits=4)` "
        f"({data['tolerance_ulps'][K2M4]:g} ulps: the lattice 4 ulps, so `fn`'s output is "
        "rounded 4x coarser); `exact-nolattice` = `ExactState(guard_bits=0)`, the previous "
        "exact state (exact only for bit-identical re-evaluations). All with "
        "`ReversibleAdjoint(on_mismatch='ignore', vmap_backward='batch')` (the loss sums the "
        "examples); **mismatched solves** counts the "
        "solves whose backward pass did not rebuild `z0` (its `report`), i.e. where the "
        "gradient is not exact.",
        f"- {s['steps']} steps (`tol=0`), batch {s['batch']}, fn float32; `batched` = one "
        "solve of the whole batch with the block `vmap`ped inside `fn`, `vmap` = the solve "
        "`jax.vmap`ped per example. Loss: mean squared distance of the fixed point from a "
        "fixed target; gradient w.r.t. all block parameters and the input.",
        "- **time**: median of one jitted value-and-grad step over interleaved rounds "
        "(every program of the block once per round, random order); **mem**: compiled "
        "`temp_size_in_bytes`; **buffer**: the information buffer the state needs, "
        "2 × ⌈steps / d⌉ uint32 words per state element (`d` digits of radix "
        "b·2^guard_bits per word); **buffer copies**: `copy` instructions in "
        "`compile().as_text()` that copy a whole buffer; **grad diff**: worst-leaf "
        "relative difference between the `exact` (or `exact-k2m4`) and `exact-nolattice` "
        "gradients (the "
        "lattice rounding where both reverse exactly).",
        f"- Goal (issue 9): time ≤ {GOAL['time']}×, memory ≤ {GOAL['memory']}× the previous state.",
        "",
        "## What this shows",
        "",
        *summary(data),
        "",
        "## New / old ratios",
        "",
        *h.md_table(
            [
                "block",
                "layout",
                "β",
                "time ×",
                "mem ×",
                "mem × (m4)",
                "mem × (k2m4)",
                "extra temp MiB",
                "extra buffer MiB",
                "extra temp / extra buffer",
                "grad diff",
                "grad diff (k2m4)",
            ],
            [
                [
                    name,
                    r["layout"],
                    r["beta"],
                    f"{r['time_ratio']:.2f}",
                    f"{r['temp_ratio']:.2f}",
                    f"{r['m4_temp_ratio']:.2f}",
                    f"{r['k2m4_temp_ratio']:.2f}",
                    f"{r['extra_temp_mib']:.2f}",
                    f"{r['extra_buffer_mib']:.2f}",
                    f"{r['extra_temp_per_extra_buffer']:.2f}",
                    h.fmt_err(r["grad_rel_diff"]),
                    h.fmt_err(r["k2m4_grad_rel_diff"]),
                ]
                for name, blk in data["blocks"].items()
                for r in blk["ratios"]
            ],
            left=3,
        ),
        "",
        "## Per program",
        "",
        *h.md_table(
            [
                "block",
                "layout",
                "β",
                "state",
                "time ms",
                "mem MiB",
                "buffer bits/elem/step",
                "buffer MiB",
                "buffer copies",
                "all copies",
                "mismatched solves",
            ],
            [
                [
                    name,
                    r["layout"],
                    r["beta"],
                    r["state"],
                    f"{r['time']['median_ms']:.1f}",
                    f"{r['memory']['temp_mib']:.2f}",
                    f"{r['buffer_bits_per_step']:.1f}",
                    f"{r['buffer_mib']:.2f}",
                    r["buffer_copies"],
                    r["copies"],
                    r["mismatches"],
                ]
                for name, blk in data["blocks"].items()
                for r in blk["rows"]
            ],
            left=4,
        ),
    ]
    out += [
        "",
        "Blocks: "
        + "; ".join(
            f"**{n}**: {b['description']}, {b['num_params']} parameters, "
            f"{b['state_elements']} state elements per batch "
            f"({b['compile_s'] / 60:.1f} min compiling, {b['wall_s'] / 60:.1f} min in all)"
            for n, b in data["blocks"].items()
        )
        + ".",
        "",
    ]
    path.write_text("\n".join(out))


def _information_bound(data) -> dict[str, float]:
    """Per block/layout/β: the temp-memory ratio to the old state if the buffer held only
    the information the default's guarantee needs, 2 * (log2 b + 6) bits per element per
    step (the remainder, and one of 64 lattice candidates), with the old program's bytes
    per buffer bit and nothing else changed."""
    out = {}
    for name, blk in data["blocks"].items():
        for r in blk["rows"]:
            if r["state"] != OLD:
                continue
            b = rdeq.ExactState().resolve(jnp.zeros(1), r["beta"], 1).ratio[1]
            need = 2 * (math.log2(b) + 6)
            per_bit = r["buffer_mib"] / r["buffer_bits_per_step"]
            temp = r["memory"]["temp_mib"]
            extra = (need - r["buffer_bits_per_step"]) * per_bit
            out[f"{name}/{r['layout']}/β={r['beta']}"] = (temp + extra) / temp
    return out


def summary(data) -> list[str]:
    ratios = [(n, r) for n, b in data["blocks"].items() for r in b["ratios"]]
    t = [r["time_ratio"] for _, r in ratios]
    m = [r["temp_ratio"] for _, r in ratios]
    m4 = [r["m4_temp_ratio"] for _, r in ratios]
    k2m4 = [r["k2m4_temp_ratio"] for _, r in ratios]
    k2m4_miss = [r for _, r in ratios if r["k2m4_temp_ratio"] > GOAL["memory"]]
    diff = [r["grad_rel_diff"] for _, r in ratios if math.isfinite(r["grad_rel_diff"])]
    k2m4_diff = [
        r["k2m4_grad_rel_diff"] for _, r in ratios if math.isfinite(r["k2m4_grad_rel_diff"])
    ]
    miss_t = [f"{n}/{r['layout']}/β={r['beta']}" for n, r in ratios if r["time_ratio"] > 1.3]
    miss_m = [
        f"{n}/{r['layout']}/β={r['beta']} ({r['temp_ratio']:.2f})"
        for n, r in ratios
        if r["temp_ratio"] > GOAL["memory"]
    ]
    bound = _information_bound(data)
    bound_miss = [k for k, v in bound.items() if v > GOAL["memory"]]
    per_buf = [r["extra_temp_per_extra_buffer"] for _, r in ratios]
    batched_buf = [r["extra_temp_per_extra_buffer"] for _, r in ratios if r["layout"] == "batched"]
    rows = [(n, r) for n, b in data["blocks"].items() for r in b["rows"]]
    copies = sorted({r["buffer_copies"] for _, r in rows})
    bits = {
        s: sorted({(r["beta"], r["buffer_bits_per_step"]) for _, r in rows if r["state"] == s})
        for s in STATES
    }
    failed = {
        s: [
            f"{n}/{r['layout']}/β={r['beta']}"
            for n, r in rows
            if r["state"] == s and r["mismatches"]
        ]
        for s in STATES
    }
    out = [
        f"- **Time**: new / old = ×{h.span(t)} over every block, β and layout "
        + (
            f"(goal ≤ {GOAL['time']}: met everywhere)."
            if not miss_t
            else f"(goal ≤ {GOAL['time']}; missed at {', '.join(miss_t)})."
        ),
        f"- **Memory**: new / old = ×{h.span(m)} "
        + (
            f"(goal ≤ {GOAL['memory']}: met everywhere)."
            if not miss_m
            else f"(goal ≤ {GOAL['memory']}; missed at {', '.join(miss_m)})."
        )
        + f" With 4 guard bits: ×{h.span(m4)}. With a 4-ulp lattice and 4 guard bits "
        f"(`exact-k2m4`, tolerance {data['tolerance_ulps'][K2M4]:g} ulps against the "
        f"default's {data['tolerance_ulps'][NEW]:g}): ×{h.span(k2m4)}"
        + (" (goal met everywhere)" if not k2m4_miss else f" (goal missed in {len(k2m4_miss)})")
        + f", for a gradient that differs from the unrounded one by {h.span(k2m4_diff, '.1e')} "
        f"relative where both reverse exactly (the default: {h.span(diff, '.1e')}).",
        "- **Why the memory grows**: the guard bits widen every digit of the information "
        "buffer from radix b to b·2^guard_bits, so the buffer takes "
        + ", ".join(
            f"{b1:.1f} instead of {b0:.1f} bits per element per step at β={beta}"
            for (beta, b1), (_, b0) in zip(bits[NEW], bits[OLD])
        )
        + f". The extra temp memory is ×{h.span(per_buf)} the extra buffer size (×"
        f"{h.span(batched_buf)} with one solve per batch). The backward pass only reads the "
        "buffer and the forward loop's `vmap` rule updates it in place: "
        f"{'/'.join(map(str, copies))} whole-buffer `copy` instructions per program, the "
        "same for every state and layout. The ratio is high where the buffer "
        "dominates temp memory (small blocks with many state elements and few "
        "activations) and at β = 0.5, where the old buffer was tiny (2 bits per step).",
        "- **No encoding of the buffer meets the memory goal at this tolerance.** To recover "
        "a lattice index from a re-evaluation up to 31.5 lattice units off, the backward "
        "pass must tell 64 candidates apart: 6 bits per element and evaluation beside the "
        "log2(b) of the remainder, whatever the encoding, so at least 2·(log2 b + 6) bits "
        "per element per step (14, 16.6 and 17.3 at β = 0.5, 0.8, 0.9, against 16, 21.3 "
        "and 21.3 as packed). With that buffer and nothing else added, the memory ratio "
        f"would be ×{h.span(list(bound.values()))}"
        + (
            f", still over {GOAL['memory']} at {', '.join(bound_miss)}."
            if bound_miss
            else f", within {GOAL['memory']}."
        )
        + " Only a smaller tolerance or a coarser lattice shrinks the buffer further "
        "(`exact-m4`, `exact-k2m4`).",
    ]
    for s in STATES:
        where = failed[s]
        out.append(
            f"- **`{s}`** ({data['tolerance_ulps'][s]:g} ulps): "
            + (
                "every backward pass rebuilt `z0` to the bit."
                if not where
                else f"the backward pass did not rebuild `z0` at {', '.join(where)}: "
                "re-evaluations of `fn` beyond its tolerance (with the default "
                "`on_mismatch='raise'` the gradient is refused)."
            )
        )
    return out


def plot(data, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, t, m, m4, k2m4 = [], [], [], [], []
    for name, blk in data["blocks"].items():
        for r in blk["ratios"]:
            labels.append(f"{name}\n{r['layout']}\nβ={r['beta']}")
            t.append(r["time_ratio"])
            m.append(r["temp_ratio"])
            m4.append(r["m4_temp_ratio"])
            k2m4.append(r["k2m4_temp_ratio"])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(labels)), 4.5))
    ax.bar(x - 0.3, t, 0.2, label="time, new / old")
    ax.bar(x - 0.1, m, 0.2, label="compiled temp memory, new / old")
    ax.bar(x + 0.1, m4, 0.2, label="memory, 4 guard bits / old")
    ax.bar(x + 0.3, k2m4, 0.2, label="memory, 4-ulp lattice + 4 guard bits / old")
    ax.axhline(GOAL["time"], color="C0", ls="--", lw=1, label=f"time goal {GOAL['time']}×")
    ax.axhline(GOAL["memory"], color="C1", ls="--", lw=1, label=f"memory goal {GOAL['memory']}×")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ratio")
    ax.set_title(
        f"ExactState() vs ExactState(guard_bits=0), {data['settings']['steps']} steps, "
        "one jitted gradient step"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--blocks", nargs="+", choices=list(blocks_lib.BLOCKS), default=None)


def main(argv=None) -> dict[str, Any]:
    return h.cli(
        "exact", __doc__, run, write_markdown, plot, argv=argv, add_arguments=add_arguments
    )


if __name__ == "__main__":
    main()
