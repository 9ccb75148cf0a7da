"""`DEQ`: an equilibrium layer as an Equinox module."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp

from .._adjoint.base import AbstractAdjoint
from .._custom_types import StepBudget
from .._fixed_point import check_options, default_adjoint, fixed_point
from .._solution import Solution
from .._solver.base import AbstractSolver
from .._solver.reversible import Reversible


class DEQ(eqx.Module):
    r"""A deep equilibrium layer: returns the fixed point $z^* = \text{layer}(z^*, x)$.

    Holds the equilibrium `layer` (any callable `layer(z, x) -> z`, usually an
    `eqx.Module` whose arrays are trained) and the strategy objects that solve and
    differentiate it. Compose it inside any model; like `eqx.nn.Linear` it acts on a single
    example, so `jax.vmap` it over a batch (each example then stops on its own residual).

    ```python
    deq = rdeq.DEQ(layer, solver=rdeq.Reversible(beta=0.5), max_steps=4, tol=1e-3)
    z = deq(x)                               # z0 = zeros_like(x)
    z, sol = deq(x, return_solution=True)    # sol.num_steps, sol.residual, sol.nfe
    z = deq(x, step_budget=jnp.asarray(2))   # at most 2 steps, same compiled program
    ```

    **Arguments:**

    - `layer`: the equilibrium function, called as `layer(z, x)`.
    - `solver`: forward solver (default `Reversible(beta=0.5)`, whose `"auto"` state is
      the bit-exact [`revdeq_jax.ExactState`][] for float32/bfloat16 models under the
      reversible adjoint, and the dtype of the model otherwise).
    - `adjoint`: gradient strategy (default: `ReversibleAdjoint()` for a reversible
      solver, `ImplicitAdjoint()` for any other).
    - `max_steps`: solver step budget; the ceiling of the `step_budget` a call may pass.
    - `tol`: the relative tolerance, another name for `rtol`.
    - `throw`: raise at run time on non-finite values.
    - `rtol`, `atol`: stop once
      $\|f(z) - z\|_\mathrm{rms} \le \mathrm{atol} + \mathrm{rtol}\,\|f(z)\|_\mathrm{rms}$
      (defaults `rtol=1e-3`, `atol=0`; see [`revdeq_jax.fixed_point`][]). `rtol=atol=0`
      always takes `max_steps` steps.
    """

    layer: Callable
    solver: AbstractSolver
    adjoint: AbstractAdjoint
    max_steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        layer: Callable,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
        max_steps: int = 8,
        tol: float | None = None,
        throw: bool = False,
        *,
        rtol: float | None = None,
        atol: float = 0.0,
    ):
        self.layer = layer
        self.solver = Reversible() if solver is None else solver
        self.adjoint = default_adjoint(self.solver) if adjoint is None else adjoint
        self.max_steps = max_steps
        self.rtol, self.atol = check_options(
            self.solver, self.adjoint, max_steps, rtol, atol, tol, owner="DEQ"
        )
        self.throw = throw

    def __check_init__(self):
        self.adjoint.check(self.solver)

    @property
    def tol(self) -> float:
        """The relative tolerance `rtol`, under its other name."""
        return self.rtol

    def __call__(
        self,
        x: Any,
        z0: Any = None,
        *,
        return_solution: bool = False,
        step_budget: StepBudget | None = None,
    ) -> Any | tuple[Any, Solution]:
        """**Arguments:**

        - `x`: the input injection, passed to `layer` as its second argument (any PyTree).
        - `z0`: initial state; defaults to `jnp.zeros_like(x)` when `x` is an array.
        - `return_solution`: also return the [`revdeq_jax.Solution`][] (solver
          statistics).
        - `step_budget`: at most this many solver steps for this call, below the
          layer's `max_steps` (the compiled ceiling). An integer scalar array, so that
          its value changes without recompiling, e.g. to sweep NFE at evaluation; an
          array above `max_steps` is clamped to it. `None`: `max_steps`. See
          [`revdeq_jax.fixed_point`][].

        **Returns:** the fixed point, or `(fixed_point, solution)`.
        """
        if z0 is None:
            if not eqx.is_array(x):
                raise ValueError(
                    "`DEQ` needs `z0` when `x` is not a single array: call it as "
                    "`deq(x, z0)` with an initial state shaped like the layer's output."
                )
            z0 = jnp.zeros_like(x)
        sol = fixed_point(
            self.layer,
            z0,
            x,
            solver=self.solver,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            rtol=self.rtol,
            atol=self.atol,
            throw=self.throw,
            step_budget=step_budget,
        )
        return (sol.value, sol) if return_solution else sol.value
