"""The reversible gradient is the gradient of the forward pass: checked against autodiff.

`UnrolledAdjoint` is plain reverse-mode autodiff through the stored solver loop (memory
linear in the steps): the reference. `ReversibleAdjoint` stores only the last state and
walks the iteration backwards (Algorithm 1).

1. Same arithmetic, two adjoints: with a float64 state and `beta = 0.5` the reversible
   backward pass rebuilds the forward iterates to the bit for these few steps, and the two
   gradients agree to float32 rounding.
2. Depth: with the exact state (the default `"auto"` for a float32 model) the backward
   pass rebuilds `z0` to the bit even after 48 steps at `beta = 0.8`, and the gradient
   stays at float32 rounding from the float64 unrolled gradient. A float64 state (the
   paper's recipe) drifts: its rebuilt `z0` is far off, and so is its gradient.

    python examples/exactness.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import revdeq_jax as rdeq


class Layer(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(self.linear(z) + x)


def gradient(layer, x, solver, adjoint, steps):
    def loss(layer, x):
        sol = rdeq.fixed_point(
            layer, jnp.zeros_like(x), x, solver=solver, adjoint=adjoint, max_steps=steps, tol=0.0
        )  # tol=0: exactly `steps` steps
        return jnp.sum(jnp.sin(sol.value))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(layer, x)
    return [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]


def rel_error(a, b):
    return max(np.linalg.norm(x - y) / np.linalg.norm(y) for x, y in zip(a, b))


layer = Layer(eqx.nn.Linear(16, 16, key=jax.random.key(0)))
# A large weight (x3): the layer amplifies perturbations, as deep real blocks do, which is
# where reversal in floating point drifts.
layer = eqx.tree_at(lambda l: l.linear.weight, layer, 3 * layer.linear.weight)
x = jax.random.normal(jax.random.key(1), (16,))

# 1. The same computation differentiated two ways.
solver = rdeq.Reversible(beta=0.5, state_dtype=jnp.float64)
rev = gradient(layer, x, solver, rdeq.ReversibleAdjoint(), steps=8)
unrolled = gradient(layer, x, solver, rdeq.UnrolledAdjoint(), steps=8)
print(f"float64 state, 8 steps: reversible vs unrolled  {rel_error(rev, unrolled):.1e}")

# 2. Deep solves: the reference is the unrolled gradient computed entirely in float64.
beta, steps = 0.8, 48
with jax.enable_x64(True):
    layer64 = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, layer)
    reference = gradient(
        layer64, x.astype(jnp.float64), rdeq.Reversible(beta), rdeq.UnrolledAdjoint(), steps
    )
for state in ["auto", jnp.float64]:
    reports = []
    adjoint = rdeq.ReversibleAdjoint(on_mismatch="ignore", report=reports.append)
    g = gradient(layer, x, rdeq.Reversible(beta, state_dtype=state), adjoint, steps)
    jax.effects_barrier()
    name = "exact (auto)" if state == "auto" else "float64"
    print(
        f"{name:>12} state, {steps} steps at beta={beta}: gradient error "
        f"{rel_error(g, reference):.1e}, z0 rebuilt to within {float(reports[-1]['abs']):.1e}"
    )
