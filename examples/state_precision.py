"""Choosing a state precision: how exactly does the backward pass rebuild the forward?

`Reversible(beta, state_dtype=...)` sets how the solver holds its coupled state `(y, z)`;
`fn` always runs in the dtype of `z0`. `rdeq.reconstruction_error` runs one real
reversible backward pass and reports how far the `z0` it rebuilt lies from the true one:
0 means the gradient is exactly the gradient of the forward pass. Here: a float32 layer,
`beta = 0.8`, 8 and 64 steps, every state option.

- `"exact"` (what `"auto"` picks for a float32 model): rebuilt to the bit at every depth.
- `jnp.float64` (the paper's recipe) and `"float32x2"` (~48 bits, no 64-bit types):
  exact or close for a few steps, then drifting geometrically.
- `None` (the dtype of `z0`): loses bits from the first step.

    python examples/state_precision.py
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import revdeq_jax as rdeq


class Layer(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, z, x):
        return jnp.tanh(self.linear(z) + x)


layer = Layer(eqx.nn.Linear(32, 32, key=jax.random.key(0)))
layer = eqx.tree_at(lambda l: l.linear.weight, layer, 2 * layer.linear.weight)
x = jax.random.normal(jax.random.key(1), (32,))
z0 = jnp.zeros_like(x)

states = {"exact": "exact", "float64": jnp.float64, "float32x2": "float32x2", "None": None}
depths = [8, 64]
print(f"relative deviation of the rebuilt z0, beta = 0.8 ({', '.join(map(str, depths))} steps)")
for name, state in states.items():
    solver = rdeq.Reversible(beta=0.8, state_dtype=state)
    row = []
    for steps in depths:
        report = rdeq.reconstruction_error(layer, z0, x, solver=solver, max_steps=steps, tol=0.0)
        flag = " (mismatch)" if report["mismatch"] else ""
        row.append(f"{float(report['rel']):9.1e}{flag}")
    print(f"  {name:>9}: " + "  ".join(row))

# The exact state's knobs: a lattice of 2**lattice_bits ulps and guard_bits stored bits per
# evaluation. Reversal is exact whenever the backward re-evaluation of fn lies within
# (2**(guard_bits - 1) - 1/2) * 2**lattice_bits ulps of the forward's value (7.5 by default).
tolerant = rdeq.ExactState(lattice_bits=1, guard_bits=5)  # 31 ulps, coarser rounding of fn
report = rdeq.reconstruction_error(
    layer, z0, x, solver=rdeq.Reversible(0.8, state_dtype=tolerant), max_steps=64, tol=0.0
)
print(
    f"ExactState(lattice_bits=1, guard_bits=5), 64 steps: deviation {float(report['rel']):.1e}, "
    f"largest re-evaluation drift {float(report['drift']):.2g} lattice units"
)
