"""Implicit-function-theorem gradients (classic DEQ)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._iterate import check_tolerances, Inputs, iterate, lax_while_loop, LoopResult, Primal
from .._misc import materialise, tree_add
from .._solver.anderson import Anderson
from .._solver.base import AbstractSolver
from .base import AbstractAdjoint


class ImplicitAdjoint(AbstractAdjoint):
    r"""The implicit-function-theorem gradient of classic DEQs.

    Treats the output as the exact fixed point $z^* = f(z^*, x; \theta)$, so for a
    cotangent $\bar z$ it solves the adjoint fixed-point system
    $w = \bar z + J_z f(z^*)^\top w$ with `solver` (its own `rtol`, `atol` and `max_steps`) and
    returns $\bar\theta = \partial_\theta f(z^*)^\top w$, $\bar x = \partial_x f(z^*)^\top w$,
    and a zero cotangent for `z0`. Memory is constant in the number of steps.

    !!! warning

        This gradient is approximate twice over: the forward iterate is not the exact
        fixed point, and the backward system is solved to a tolerance. It differs from
        the gradient of the computation actually performed, which is what
        [`revdeq_jax.ReversibleAdjoint`][] returns. Prefer that where the solver allows.

    The backward solve stops by the same test as the forward one (see
    [`revdeq_jax.fixed_point`][]), applied to $g(w) = \bar z + J_z f(z^*)^\top w$:
    $\|g(w) - w\|_\mathrm{rms} \le \mathrm{atol} + \mathrm{rtol}\,\|g(w)\|_\mathrm{rms}$.
    `atol` is in the units of the cotangent $\bar z$.
    """

    solver: AbstractSolver
    rtol: float
    atol: float
    max_steps: int

    def __init__(
        self,
        solver: AbstractSolver = Anderson(),
        tol: float | None = None,
        max_steps: int = 30,
        *,
        rtol: float | None = None,
        atol: float = 0.0,
    ):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"`ImplicitAdjoint(max_steps={max_steps!r})` must be an int >= 1.")
        self.solver = solver
        self.rtol, self.atol = check_tolerances(
            rtol, atol, tol, default_rtol=1e-6, owner="ImplicitAdjoint"
        )
        self.max_steps = max_steps

    @property
    def tol(self) -> float:
        """The relative tolerance `rtol` of the backward solve, under its other name."""
        return self.rtol

    def apply(self, primal: Primal, inputs: Inputs, solver: AbstractSolver) -> LoopResult:
        del solver
        out = _implicit_solve(inputs, primal, self)
        return eqx.tree_at(lambda r: r.residual, out, jax.lax.stop_gradient(out.residual))


def _forward(inputs, primal) -> LoopResult:
    return eqx.tree_at(lambda r: r.state, primal(inputs, lax_while_loop), None)


@eqx.filter_custom_vjp
def _implicit_solve(inputs, primal, adjoint):
    del adjoint
    return _forward(inputs, primal)


@_implicit_solve.def_fwd
def _implicit_solve_fwd(perturbed, inputs, primal, adjoint):
    del perturbed, adjoint
    out = _forward(inputs, primal)
    return out, out.value


@_implicit_solve.def_bwd
def _implicit_solve_bwd(z_star, grad_out, perturbed, inputs, primal, adjoint):
    del perturbed, primal
    fn, args, z0 = inputs
    z_bar = materialise(grad_out.value, z0)
    _, pull_z = jax.vjp(lambda z: fn(z, args), z_star)

    def _adjoint_fn(w, _):
        (jtw,) = pull_z(w)
        return tree_add(z_bar, jtw)

    # The adjoint system w = z_bar + J^T w is a fixed-point problem of its own.
    solver = adjoint.solver.prepare(z_bar, adjoint.max_steps)
    w = iterate(
        (_adjoint_fn, None, z_bar),
        lax_while_loop,
        solver=solver,
        max_steps=adjoint.max_steps,
        rtol=adjoint.rtol,
        atol=adjoint.atol,
    ).value
    _, pull_params = eqx.filter_vjp(lambda f, a: f(z_star, a), fn, args)
    fn_bar, args_bar = pull_params(w)
    # The IFT gradient does not depend on the initial guess.
    return fn_bar, args_bar, jtu.tree_map(jnp.zeros_like, z0)


ImplicitAdjoint.__init__.__doc__ = """**Arguments:**

- `solver`: the solver for the backward system (default `Anderson()`).
- `tol`: the relative tolerance of the backward solve, another name for `rtol`.
- `max_steps`: step limit of the backward solve.
- `rtol`: relative tolerance of the backward solve (default `1e-6`).
- `atol`: absolute tolerance of the backward solve (default 0), in the units of the
  cotangent.
"""
