"""A tiny RevDEQ language model: one jitted train step from `experiments.language`.

The model is the experiment's `DEQTransformerLM` (token and position embeddings, ONE
equilibrium transformer layer solved by `rdeq.DEQ` with the reversible solver and adjoint,
a LayerNorm and a linear head), built from the `tiny` config made even smaller. Random
token ids stand in for WikiText so that nothing is downloaded; `make train-wikitext`
trains on the real data.

    python examples/lm_train_step.py        # from the repository root
"""

import dataclasses

import equinox as eqx
import jax
import optax

from experiments.language.configs import CONFIGS
from experiments.language.model import lm_loss, make_model


config = dataclasses.replace(CONFIGS["tiny"], dim=16, seq_len=8, max_steps=2, dropout=0.0)
model = make_model(config, key=jax.random.key(0))
optimizer = optax.adamw(config.lr)
opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
print(
    f"{config.model} LM, dim {config.dim}, {config.max_steps} reversible steps, "
    f"solver {type(model.deq.solver).__name__}, adjoint {type(model.deq.adjoint).__name__}"
)


@eqx.filter_jit
def train_step(model, opt_state, inputs, targets, key):
    (loss, stats), grads = eqx.filter_value_and_grad(lm_loss, has_aux=True)(
        model, inputs, targets, key=key
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, loss, stats


tokens = jax.random.randint(jax.random.key(1), (4, config.seq_len + 1), 0, 1000)
inputs, targets = tokens[:, :-1], tokens[:, 1:]
for step in range(3):
    model, opt_state, loss, stats = train_step(
        model, opt_state, inputs, targets, jax.random.fold_in(jax.random.key(2), step)
    )
    shown = {k: float(v) for k, v in stats.items() if k not in ("nll_sum", "num_tokens")}
    print(
        f"step {step}  loss {float(loss):.3f}  "
        + "  ".join(f"{k} {v:.3g}" for k, v in shown.items())
    )
