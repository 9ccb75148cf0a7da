"""What the reversible backward pass of per-example solves costs under `jax.vmap`.

    python -m benchmarks.batch_memory [--quick] [--out benchmarks/results]

The experiments `vmap` their per-example models over the batch, so each example stops on
its own residual. For their whole jitted train steps (loss, gradient, optimiser update)
at batch 32 it measures compiled memory (`lower(...).compile().memory_analysis()`, no
run: the `paper` language model is only compiled) of three programs:

* `per-example rule`: `ReversibleAdjoint(vmap_backward="per_example")`, the backward
  loop of one solve batched by `vmap`, which carries one cotangent of every parameter of
  the equilibrium block per example;
* `batch rule` (`vmap_backward="batch"`, for the gradient of a summed loss, as here): one
  backward loop for the batch, `fn` evaluated as the VJP of the batched function,
  shared-parameter cotangents summed as they arrive;
* `batched fn`: one solve of the whole batch with `eqx.filter_vmap(layer)` (one residual
  and one stopping decision for the batch): the memory to match;

for the language model at the `small` and `paper` configurations and the multi-scale
vision model at `paper-170k`; and, at the small sizes, the train-step time of the batch
rule over the per-example rule, both run, timed interleaved.

Writes `batch_memory.md` and `batch_memory.json` into `--out` (`--replot` rewrites the
first from the second). `--quick` skips the `paper` language model and times fewer rounds.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import revdeq_jax as rdeq
from experiments.common.optim import TrainState
from experiments.language import configs as lm_configs, train as lm_train
from experiments.vision import (
    configs as vision_configs,
    data as vdata,
    train as vision_train,
)

from . import _harness as h


RULES = ("per_example", "batch", "batched_fn")
LABELS = {
    "per_example": "per-example rule",
    "batch": "batch rule",
    "batched_fn": "batched fn",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    batch: int = 32
    cases: tuple[str, ...] = ("lm-small", "lm-paper", "vision-paper-170k")
    timed: tuple[str, ...] = ("lm-small", "vision-paper-170k")
    timing: h.Timing = h.Timing(max_rounds=7, min_rounds=5, round_budget_s=60.0)


QUICK = Settings(cases=("lm-small", "vision-paper-170k"), timing=h.QUICK_TIMING)


def _with_rule(model, rule: str):
    """`model` with every `ReversibleAdjoint` in it set to `vmap_backward=rule`."""
    is_adjoint = lambda x: isinstance(x, rdeq.ReversibleAdjoint)
    return jax.tree.map(
        lambda x: dataclasses.replace(x, vmap_backward=rule) if is_adjoint(x) else x,
        model,
        is_leaf=is_adjoint,
    )


def _batched_deq(deq: rdeq.DEQ) -> rdeq.DEQ:
    """`deq` solving a whole batch at once: its layer `vmap`ped inside `fn`."""
    return eqx.tree_at(lambda d: d.layer, deq, eqx.filter_vmap(deq.layer))


# --- the programs ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """One train step to compile (and, for the timed cases, run)."""

    step: Callable  # an `eqx.filter_jit`ted train step
    shapes: tuple  # its arguments as shapes (for `lower`)
    concrete: Callable[[], tuple]  # its arguments as arrays (for running)
    deq_params: int  # parameters of the equilibrium blocks
    params: int  # parameters of the whole model


def _optimised_step(config, loss: Callable) -> Callable:
    """A train step like the experiments' own (value and gradient, optimiser update) of
    `loss(model, model_state, batch, key) -> (value, model_state)`."""
    from experiments.common.optim import make_optimizer

    optimizer, _ = make_optimizer(config)

    @eqx.filter_jit
    def train_step(state: TrainState, batch, key):
        (value, model_state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            state.model, state.model_state, batch, key
        )
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, value=value)
        model = eqx.apply_updates(state.model, updates)
        return TrainState(model, opt_state, state.step + 1, model_state), value

    return train_step


def _lm_batched_loss(model, model_state, batch, key):
    """`lm_loss` of `DEQTransformerLM`, with one solve of the whole batch."""
    inputs, targets = batch
    x = jax.vmap(model.embed)(inputs)
    dropout = rdeq.nn.VariationalDropout(model.dropout)
    keys = jr.split(key, inputs.shape[0])
    masks = jax.vmap(lambda k: dropout.mask((2, model.dim), key=k, dtype=x.dtype))(keys)
    z = _batched_deq(model.deq)((x, masks), jnp.zeros_like(x))
    logits = jax.vmap(model.head)(z)
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.mean(nll), model_state


def _vision_batched_loss(model, bn_state, batch, key):
    """The vision train step's loss (no augmentation) with one solve of the whole batch per
    scale; the BatchNorms, outside the solves, still normalise over the batch."""
    del key
    per_example = lambda f: jax.vmap(f, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    x = vdata.normalise(batch["image"])
    hidden, bn_state = per_example(lambda x, s: model.encoder_norm(model.encoder(x), s))(
        x, bn_state
    )
    hidden = jax.nn.relu(hidden)
    for i, block in enumerate(model.blocks):
        z = _batched_deq(block)(hidden)
        hidden = hidden + z if model.deq_residual else z
        if i < len(model.downsamples):
            hidden, bn_state = per_example(model.downsamples[i])(hidden, bn_state)
    logits = jax.vmap(lambda h: model.head(jnp.mean(h, axis=(1, 2))))(hidden)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, bn_state


def _num_params(tree) -> int:
    """Floating array elements in `tree` (arrays or shapes)."""
    leaves = jax.tree.leaves(tree)
    return sum(
        int(x.size) for x in leaves if _is_dynamic(x) and jnp.issubdtype(x.dtype, jnp.inexact)
    )


def _deq_params(model) -> int:
    is_deq = lambda x: isinstance(x, rdeq.DEQ)
    deqs = [x for x in jax.tree.leaves(model, is_leaf=is_deq) if is_deq(x)]
    return sum(_num_params(d.layer) for d in deqs)


def program(case: str, rule: str, batch: int) -> Program:
    """The train step of `case` (`lm-<config>` or `vision-<config>`) under `rule`."""
    kind, config_name = case.split("-", 1)
    if kind == "lm":
        config = dataclasses.replace(lm_configs.CONFIGS[config_name], batch_size=batch)
        init, own_step, batched_loss = (
            lm_train.init_state,
            lm_train.make_train_step,
            _lm_batched_loss,
        )

        def make_batch():
            ids = jr.randint(jr.key(1), (batch, config.seq_len), 0, 50257)
            return ids, jnp.roll(ids, -1, axis=1)

    else:
        config = dataclasses.replace(
            vision_configs.CONFIGS[config_name], batch_size=batch, augment=False
        )
        init, own_step = vision_train.init_state, vision_train.make_train_step
        batched_loss = _vision_batched_loss

        def make_batch():
            images = jr.randint(jr.key(1), (batch, 32, 32, 3), 0, 256).astype(jnp.uint8)
            return {"image": images, "label": jnp.arange(batch, dtype=jnp.int32) % 10}

    if rule == "batched_fn":
        step, prepare = _optimised_step(config, batched_loss), lambda state: state
    else:  # the experiment's own train step, with its adjoints set to `rule`
        step, prepare = own_step(config), lambda state: _with_rule(state, rule)
    state = prepare(eqx.filter_eval_shape(init, config))
    shapes = (state, jax.eval_shape(make_batch), jax.eval_shape(lambda: jr.key(0)))
    return Program(
        step=step,
        shapes=shapes,
        concrete=lambda: (prepare(init(config)), make_batch(), jr.key(0)),
        deq_params=_deq_params(state.model),
        params=_num_params(state.model),
    )


# --- measuring -----------------------------------------------------------------------------


def _is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct))


def _compile(compiler: h.Compiler, what: str, prog: Program):
    """`prog.step` lowered from shapes and compiled; called with the array leaves of its
    arguments (`eqx.partition(args, eqx.is_array)[0]`)."""
    dynamic, static = eqx.partition(prog.shapes, _is_dynamic)

    def _step(dynamic):
        return eqx.filter(prog.step(*eqx.combine(dynamic, static)), eqx.is_array)

    return compiler(what, _step, dynamic)


def run(args) -> dict[str, Any]:
    settings = QUICK if args.quick else Settings()
    compiler = h.Compiler()
    memory: dict[str, dict[str, Any]] = {}
    timed: dict[str, dict[str, tuple]] = {}
    for case in settings.cases:
        memory[case] = {}
        for rule in RULES:
            prog = program(case, rule, settings.batch)
            compiled = _compile(compiler, f"{case} {rule}", prog)
            memory[case][rule] = h.memory_of(compiled)
            memory[case]["deq_params"] = prog.deq_params
            memory[case]["params"] = prog.params
            print(f"{case:>18} {rule:>12}: temp {memory[case][rule]['temp_mib']:8.1f} MiB")
            if case in settings.timed and rule != "batched_fn":
                dynamic = eqx.filter(prog.concrete(), eqx.is_array)
                timed.setdefault(case, {})[rule] = (compiled, (dynamic,))
            del compiled
    timing = {
        case: h.time_interleaved(programs, settings.timing, desc=case)
        for case, programs in timed.items()
    }
    return {
        "settings": {**dataclasses.asdict(settings), "quick": args.quick},
        "memory": memory,
        "timing": timing,
        "compile": compiler.log,
    }


def write_markdown(data: dict[str, Any], path: Path) -> None:
    s = data["settings"]
    lines = [
        "# The reversible backward pass under `vmap`: batch rule vs per-example rule",
        "",
        *h.provenance(data, "batch_memory"),
        "",
        f"Whole jitted train steps (loss, gradient, optimiser update) at batch {s['batch']}, "
        "the experiments' own for the two rules, per-example solves under `jax.vmap`; "
        "`batched fn` is the same model with one solve of the whole batch "
        "(`eqx.filter_vmap(layer)`, one residual for the batch). Compiled temporary memory "
        "(`memory_analysis().temp_size_in_bytes`), deterministic; compiled, not run.",
        "",
    ]
    head = [
        "case",
        "params (DEQ blocks)",
        *[f"{LABELS[r]} (MiB)" for r in RULES],
        "batch / batched fn",
        "per-example / batch",
    ]
    rows = []
    for case, m in data["memory"].items():
        temp = {r: m[r]["temp_mib"] for r in RULES}
        rows.append(
            [
                f"`{case}`",
                f"{m['params'] / 1e6:.2f}M ({m['deq_params'] / 1e6:.3f}M)",
                *[f"{temp[r]:.1f}" for r in RULES],
                f"{temp['batch'] / temp['batched_fn']:.3f}",
                f"{temp['per_example'] / temp['batch']:.2f}",
            ]
        )
    lines += h.md_table(head, rows)
    if data["timing"]:
        lines += [
            "",
            "Train-step time, both rules run on the same arrays, timed interleaved "
            "(median over rounds, compile excluded):",
            "",
        ]
        rows = []
        for case, t in data["timing"].items():
            old, new = t["per_example"]["median_ms"], t["batch"]["median_ms"]
            rows.append(
                [f"`{case}`", f"{old:.0f}", f"{new:.0f}", f"{new / old:.3f}", t["batch"]["rounds"]]
            )
        lines += h.md_table(
            ["case", "per-example rule (ms)", "batch rule (ms)", "batch / per-example", "rounds"],
            rows,
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    return h.cli("batch_memory", __doc__, run, write_markdown, None, argv=argv)


if __name__ == "__main__":
    main()
