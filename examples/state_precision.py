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

# The exact state's knobs: a lattice of 2**lattice_bits ulps (of fn's dtype, at the leaf's
# largest binade) and guard_bits stored bits per evaluation. Reversal is exact whenever the
# backward re-evaluation of fn lies within (2**(guard_bits - 1) - 1/2) * 2**lattice_bits ulps
# of the forward's value (at least 31.5 by default), and fn's output is rounded to within
# half a lattice spacing. With `refine` (the default) the guard bits the buffer's packing
# would leave unused go to a finer lattice: at beta = 0.8 the default's (0, 6) become
# (-2, 8), 31.875 ulps of tolerance with fn rounded to within 1/8 ulp, in the same buffer.
# "drift" is how far the re-evaluations landed from the values they were snapped to, in ulps
# (up to half the lattice spacing when they repeat the forward's bits).
knobs = {
    "ExactState()": rdeq.ExactState(),  # the default
    # 31 ulps on a 2-ulp lattice (nothing to refine at 0.8): coarser rounding, smaller buffer
    "ExactState(lattice_bits=1, guard_bits=5)": rdeq.ExactState(lattice_bits=1, guard_bits=5),
}
for name, state in knobs.items():
    k, m = state.bits_in_use(0.8)
    report = rdeq.reconstruction_error(
        layer, z0, x, solver=rdeq.Reversible(0.8, state_dtype=state), max_steps=64, tol=0.0
    )
    print(
        f"{name}: in use lattice_bits={k}, guard_bits={m}, tolerance "
        f"{state.tolerance_ulps(0.8):g} ulps, rounding {state.rounding_ulps(0.8):g} ulp, "
        f"{state.buffer_bits_per_step(0.8):.3g} buffer bits per element per step; 64 steps: "
        f"deviation {float(report['rel']):.1e}, largest re-evaluation drift "
        f"{float(report['drift']):.2g} ulps"
    )
