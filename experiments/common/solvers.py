"""Config strings -> `revdeq_jax` objects: the one place where strings stop.

Both experiments name their solver, adjoint and dtypes with the same config fields
(`solver`, `adjoint`, `beta`, `state_dtype`, `anderson_m`, `implicit_tol`,
`implicit_max_steps`); `experiments.common.config.validate` has already checked the
names, so the builders here only map them.

```python
solver, adjoint = make_solver(config), make_adjoint(config)
deq = rdeq.DEQ(layer, solver=solver, adjoint=adjoint, max_steps=config.max_steps)
```
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

import revdeq_jax as rdeq


SOLVERS = ("reversible", "relaxed", "picard", "anderson", "broyden")
ADJOINTS = ("reversible", "unrolled", "checkpoint", "implicit", "phantom")
DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}
# The reversible solver's state: "auto" lets the library pick (the bit-exact integer state
# for a float32 model), None keeps the model's dtype, the rest are named states.
STATE_DTYPES = ("auto", "exact", "float32x2", "float32", "float64")


def dtype(name: str) -> Any:
    """`"float32"` -> `jnp.float32` (also `"float64"`, `"bfloat16"`)."""
    return DTYPES[name]


def make_solver(config: Any) -> rdeq.AbstractSolver:
    """The fixed-point solver named by `config.solver`."""
    if config.solver == "reversible":
        state = config.state_dtype
        if state in DTYPES:
            state = dtype(state)
        return rdeq.Reversible(beta=config.beta, state_dtype=state)
    if config.solver == "relaxed":
        return rdeq.Relaxed(beta=config.beta)
    if config.solver == "picard":
        return rdeq.Picard()
    if config.solver == "anderson":
        return rdeq.Anderson(m=config.anderson_m)
    if config.solver == "broyden":
        return rdeq.Broyden()
    raise ValueError(f"unknown solver {config.solver!r}; choose from {', '.join(SOLVERS)}")


def make_adjoint(config: Any) -> rdeq.AbstractAdjoint:
    """The gradient strategy named by `config.adjoint`."""
    if config.adjoint == "reversible":
        # The train steps differentiate the batch's mean loss (`grad` outside the
        # per-example `vmap`), where the batch rule's summed parameter cotangents are the
        # gradient, in one copy instead of one per example.
        return rdeq.ReversibleAdjoint(vmap_backward="batch")
    if config.adjoint == "unrolled":
        return rdeq.UnrolledAdjoint()
    if config.adjoint == "checkpoint":
        return rdeq.CheckpointAdjoint()
    if config.adjoint == "implicit":
        return rdeq.ImplicitAdjoint(tol=config.implicit_tol, max_steps=config.implicit_max_steps)
    if config.adjoint == "phantom":
        return rdeq.PhantomAdjoint()
    raise ValueError(f"unknown adjoint {config.adjoint!r}; choose from {', '.join(ADJOINTS)}")
