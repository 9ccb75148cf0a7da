"""A DEQ inside your own Equinox model, trained for a few steps.

An encoder computes the input injection `x`, one equilibrium layer `z* = f(z*, x)` replaces
a stack of layers, and a linear head reads out the fixed point. `rdeq.DEQ` is an ordinary
`eqx.Module` field: it acts on one example (vmap it, like `eqx.nn.Linear`), and its
defaults are the reversible solver with the exact state and the reversible adjoint, so the
gradient is the exact gradient of the forward pass, computed without storing the iterates.

    python examples/deq_in_a_model.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import revdeq_jax as rdeq


class Layer(eqx.Module):
    """f(z, x) = tanh(W z + x): the equilibrium layer."""

    linear: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(self.linear(z) + x)


class Model(eqx.Module):
    encoder: eqx.nn.Linear
    deq: rdeq.DEQ
    head: eqx.nn.Linear

    def __init__(self, in_size, width, out_size, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.encoder = eqx.nn.Linear(in_size, width, key=k1)
        linear = eqx.nn.Linear(width, width, key=k2)
        # Start well inside the contractive regime (Theorem 3.1 needs a contraction).
        linear = eqx.tree_at(lambda l: l.weight, linear, 0.5 * linear.weight)
        self.deq = rdeq.DEQ(Layer(linear), solver=rdeq.Reversible(beta=0.8), max_steps=12)
        self.head = eqx.nn.Linear(width, out_size, key=k3)

    def __call__(self, inputs):  # one example
        z, sol = self.deq(self.encoder(inputs), return_solution=True)
        return self.head(z), sol


def loss_fn(model, inputs, targets):
    preds, sol = jax.vmap(model)(inputs)  # each example stops on its own residual
    return jnp.mean((preds - targets) ** 2), sol


@eqx.filter_jit
def train_step(model, opt_state, inputs, targets):
    (loss, sol), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, inputs, targets)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss, sol


key_model, key_x, key_w = jax.random.split(jax.random.key(0), 3)
model = Model(in_size=4, width=32, out_size=1, key=key_model)
inputs = jax.random.normal(key_x, (64, 4))
targets = jnp.sin(inputs @ jax.random.normal(key_w, (4, 1)))
optimizer = optax.adam(1e-2)
opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

for step in range(20):
    model, opt_state, loss, sol = train_step(model, opt_state, inputs, targets)
    if step % 5 == 0 or step == 19:
        mean_steps, max_steps = float(jnp.mean(sol.num_steps)), int(jnp.max(sol.num_steps))
        print(
            f"step {step:2d}  loss {float(loss):.4f}  solver steps {mean_steps:.1f} "
            f"(max {max_steps})  residual {float(jnp.max(sol.residual)):.1e}"
        )
