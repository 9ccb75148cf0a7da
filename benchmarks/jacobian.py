"""Cost of Jacobian regularisation: time per train step of the language `small` config
with and without `rdeq.jacobian_penalty` in the loss.

    python -m benchmarks.jacobian [--quick] [--out benchmarks/results]

The model is the experiment's own (`experiments.language.model.make_model(
CONFIGS["small"], ...)`: RevDEQ transformer LM, dim 128, seq 128, batch 8, 4 reversible
steps, `state_dtype="auto"`), on random token ids. The train step is the experiment's:
value-and-grad of the loss, the config's optimiser (`make_optimizer`), `apply_updates`,
all in one `eqx.filter_jit`. Programs:

* `none`: the experiment's `lm_loss`, unchanged;
* `rebuilt`: the same loss rebuilt from the model's parts (below), no penalty: the
  control for the JR rows;
* `jr1`, `jr4`: the same model, its forward pass spelled out (embedding, dropout mask,
  `model.deq`, head: what `DEQTransformerLM.__call__` does) so the fixed point `z*` is at
  hand, plus `jac_reg * jacobian_penalty(model.deq.layer, stop_gradient(z*), (x, mask),
  num_probes=p)` per sequence, p = 1 and 4 (`z*` without gradient, as in Bai et al.'s
  code: the penalty acts on the parameters through `f` at fixed `z*`);
* `jr1-through-solve`: p = 1 with gradients also flowing into `z*` (through the
  reversible backward pass).

Wiring the penalty into `lm_loss` itself would need a model change (the model does not
return `z*`), so the loss is rebuilt here from the model's parts. Time is the median of
interleaved rounds; memory is the compiled temp size.

Writes `jacobian.{md,json,png}`. `--quick`: fewer timing rounds.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import revdeq_jax as rdeq
from experiments.common.optim import make_optimizer, TrainState
from experiments.language.configs import CONFIGS
from experiments.language.data import PADDED_VOCAB_SIZE
from experiments.language.model import lm_loss, make_model
from revdeq_jax.nn import VariationalDropout

from . import _harness as h


@dataclasses.dataclass(frozen=True)
class Settings:
    config: str = "small"
    # (name, num_probes, gradient through z*); "none" is the experiment's lm_loss,
    # "rebuilt" the loss rebuilt from the model's parts without the penalty
    variants: tuple[tuple[str, int, bool], ...] = (
        ("none", 0, False),
        ("rebuilt", 0, False),
        ("jr1", 1, False),
        ("jr4", 4, False),
        ("jr1-through-solve", 1, True),
    )
    jac_reg: float = 1.0  # the weight does not change the cost
    timing: h.Timing = h.Timing(max_rounds=9, round_budget_s=180.0)
    seed: int = 0


QUICK = Settings(timing=h.QUICK_TIMING)


def jr_loss(num_probes: int, through_solve: bool, jac_reg: float):
    """`lm_loss` (unweighted targets) plus Jacobian regularisation at `z*`."""

    def loss(model, inputs, targets, *, key):
        k_drop, k_probe = jr.split(key)
        drop_keys = jr.split(k_drop, inputs.shape[0])
        probe_keys = jr.split(k_probe, inputs.shape[0])

        def one(ids, kd, kp):
            x = model.embed(ids)
            mask = VariationalDropout(model.dropout).mask((2, model.dim), key=kd, dtype=x.dtype)
            z, sol = model.deq((x, mask), jnp.zeros_like(x), return_solution=True)
            at = z if through_solve else jax.lax.stop_gradient(z)
            penalty = (
                rdeq.jacobian_penalty(model.deq.layer, at, (x, mask), key=kp, num_probes=num_probes)
                if num_probes
                else jnp.zeros((), jnp.float32)
            )
            return model.head(z), penalty, sol.nfe

        logits, penalty, nfe = jax.vmap(one)(inputs, drop_keys, probe_keys)
        nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, targets)
        penalty = jnp.mean(penalty)
        return jnp.mean(nll) + jac_reg * penalty, {"penalty": penalty, "nfe": jnp.mean(nfe)}

    return loss


def make_train_step(loss_fn, optimizer):
    """The experiment's train step (jitted by the caller)."""

    def train_step(state: TrainState, inputs, targets, key):
        grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, stats), grads = grad_fn(state.model, inputs, targets, key=key)
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, value=loss)
        model = eqx.apply_updates(state.model, updates)
        return TrainState(model, opt_state, state.step + 1), (loss, stats)

    return train_step


def run(args) -> dict[str, Any]:
    settings = QUICK if args.quick else Settings()
    config = CONFIGS[settings.config]
    key = jr.key(settings.seed)
    k_model, k_data, k_step = jr.split(key, 3)
    model = make_model(config, key=k_model)
    optimizer, _ = make_optimizer(config)
    state = TrainState.create(model, optimizer)
    tokens = jr.randint(k_data, (config.batch_size, config.seq_len + 1), 0, PADDED_VOCAB_SIZE)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    dyn, static = eqx.partition((state, inputs, targets, k_step), eqx.is_array)
    compiler = h.Compiler()
    programs, rows = {}, []
    for name, probes, through in settings.variants:
        if name == "none":
            loss_fn = lambda m, i, t, *, key: lm_loss(m, i, t, key=key)
        else:
            loss_fn = jr_loss(probes, through, settings.jac_reg)
        step = make_train_step(loss_fn, optimizer)
        # jit over the arrays only (the model's static parts, e.g. the solver's beta, stay
        # Python values), as `eqx.filter_jit` does, but with a compiled object to measure
        program = lambda dyn, step=step: eqx.filter(step(*eqx.combine(dyn, static)), eqx.is_array)
        compiled = compiler(name, program, dyn)
        _, (loss, stats) = compiled(dyn)
        programs[name] = (compiled, (dyn,))
        rows.append(
            {
                "variant": name,
                "num_probes": probes,
                "through_solve": through,
                "loss": float(loss),
                "penalty": float(stats["penalty"]) if "penalty" in stats else None,
                "nfe": float(stats["nfe"]),
                "memory": h.memory_of(compiled),
            }
        )
    t = h.time_interleaved(programs, settings.timing, seed=settings.seed, desc="timing")
    base = t["none"]["median_ms"]
    for r in rows:
        r["time"] = t[r["variant"]]
        r["time_ratio"] = r["time"]["median_ms"] / base
    return {
        "settings": {**dataclasses.asdict(settings), "quick": args.quick},
        "config": {
            f: getattr(config, f)
            for f in ("dim", "num_heads", "mlp_ratio", "seq_len", "batch_size", "max_steps")
        }
        | {"beta": config.beta, "state_dtype": config.state_dtype, "solver": config.solver},
        "num_params": h.num_params(model),
        "layer_params": h.num_params(model.deq.layer),
        "rows": rows,
        "compiles": compiler.log,
    }


def write_markdown(data, path) -> None:
    c = data["config"]
    rows = {r["variant"]: r for r in data["rows"]}
    base = rows["none"]
    out = [
        "# Jacobian regularisation: cost per train step",
        "",
        *h.provenance(data, "jacobian"),
        f"- Model: the language experiment's `{data['settings']['config']}` config "
        f"(RevDEQ transformer LM, dim {c['dim']}, {c['num_heads']} heads, MLP ratio "
        f"{c['mlp_ratio']}, seq {c['seq_len']}, batch {c['batch_size']}, "
        f"{c['max_steps']} `{c['solver']}` steps at β={c['beta']}, state "
        f"`{c['state_dtype']}`), {data['num_params']:,} parameters "
        f"({data['layer_params']:,} in the equilibrium layer), random token ids. One "
        "jitted train step: value-and-grad, the config's AdamW with clipping, "
        "`apply_updates`.",
        "- `none` is the experiment's `lm_loss`; the JR rows rebuild that loss from the "
        "model's parts (the model does not return `z*`, so `lm_loss` cannot take the "
        "penalty without a model change) and add `jacobian_penalty(model.deq.layer, z*, "
        "(x, mask), num_probes=p)` per sequence, `z*` under `stop_gradient` unless "
        "'through solve'.",
        "",
        "## What this shows",
        "",
        f"- Jacobian regularisation costs ×{rows['jr1']['time_ratio']:.2f} (1 probe) and "
        f"×{rows['jr4']['time_ratio']:.2f} (4 probes) of a plain train step "
        f"({base['time']['median_ms']:.0f} ms), i.e. "
        f"{rows['jr1']['time']['median_ms'] - base['time']['median_ms']:+.0f} and "
        f"{rows['jr4']['time']['median_ms'] - base['time']['median_ms']:+.0f} ms; against "
        "the same loss rebuilt without the penalty (`rebuilt`, "
        f"×{rows['rebuilt']['time_ratio']:.2f}) ×"
        f"{rows['jr1']['time']['median_ms'] / rows['rebuilt']['time']['median_ms']:.2f} "
        f"and ×{rows['jr4']['time']['median_ms'] / rows['rebuilt']['time']['median_ms']:.2f}. "
        "The penalty adds one forward and p backward passes of the layer, and twice that "
        "again to differentiate it; with 4 reversible steps (8 evaluations forward, 8 "
        "evaluations and 8 VJPs backward) and a 50304-way softmax head dominating a step "
        "at this size, that is a modest share.",
        f"- Noise: the interquartile range of the plain step is "
        f"{base['time']['q25_ms']:.0f}–{base['time']['q75_ms']:.0f} ms (shared machine, "
        f"load {h.fmt_load(data['meta']['load_start'])} at start): read the ratios to "
        "about ±15%, and differences smaller than that (including the order of the JR "
        "rows among themselves) as noise. Compiled memory is exact.",
        f"- Letting the gradient flow into `z*` too (1 probe) costs "
        f"×{rows['jr1-through-solve']['time_ratio']:.2f}. Compiled temp memory: "
        + ", ".join(f"{n} {r['memory']['temp_mib']:.0f} MiB" for n, r in rows.items())
        + ".",
        "",
        "| variant | probes | grad into z* | time ms (median) | q25–q75 | × none | temp MiB "
        "| loss | penalty |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        out.append(
            f"| {r['variant']} | {r['num_probes']} | {'yes' if r['through_solve'] else 'no'} "
            f"| {r['time']['median_ms']:.1f} | {r['time']['q25_ms']:.1f}–"
            f"{r['time']['q75_ms']:.1f} | {r['time_ratio']:.2f} | "
            f"{r['memory']['temp_mib']:.1f} | {r['loss']:.3f} | {h.fmt(r['penalty'], '.3g')} |"
        )
    out += ["", f"Timing: {base['time']['rounds']} interleaved rounds.", ""]
    path.write_text("\n".join(out))


def plot(data, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    x = np.arange(len(rows))
    med = [r["time"]["median_ms"] for r in rows]
    err = [
        [m - r["time"]["q25_ms"] for m, r in zip(med, rows)],
        [r["time"]["q75_ms"] - m for m, r in zip(med, rows)],
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x, med, yerr=err, capsize=4, color=["C0", "C1", "C2", "C3"][: len(rows)])
    for i, r in enumerate(rows):
        ax.text(i, med[i], f"×{r['time_ratio']:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels([r["variant"] for r in rows])
    ax.set_ylabel("ms per train step (median, q25–q75)")
    ax.set_title(f"Jacobian regularisation, language `{data['settings']['config']}` config")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict[str, Any]:
    return h.cli("jacobian", __doc__, run, write_markdown, plot, argv=argv)


if __name__ == "__main__":
    main()
