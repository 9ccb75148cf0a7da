"""Exact gradients in constant memory by reversing the reversible solver (Algorithm 1)."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array

from .._custom_types import Args, Fn, Z
from .._iterate import iterate, LoopResult
from .._misc import (
    materialise,
    tree_add,
    tree_cast_like,
    zeros_like_inexact,
)
from .._precision import state_scope
from .._solver.base import AbstractReversibleSolver, AbstractSolver
from .base import AbstractAdjoint


class ReversibleAdjoint(AbstractAdjoint):
    r"""Exact backpropagation through [`revdeq_jax.Reversible`][], in O(1) memory.

    The forward pass is a `lax.while_loop` that stores nothing but the final coupled
    state $(y_N, z_N)$. The backward pass is a second `lax.while_loop` that walks the
    iteration backwards: each step rebuilds $(y_n, z_n)$ from $(y_{n+1}, z_{n+1})$ with the
    closed-form inverse and applies exactly the rules reverse-mode autodiff would apply to
    the stored graph (Algorithm 1 of the paper). Each evaluation of $f$ on the backward pass
    is a single `vjp`, whose primal output drives the reconstruction and whose pullback
    gives the cotangents, so a backward step costs 2 forward and 2 backward evaluations.

    The gradient equals that of [`revdeq_jax.UnrolledAdjoint`][] up to the rounding error
    of the reconstruction, which grows geometrically with the number of steps (about
    $1/|1-\beta|$ times the Jacobian's growth per step). Check it with
    [`revdeq_jax.reconstruction_error`][]; keep the state in float64
    (`Reversible(beta, state_dtype=jnp.float64)`) when `fn` runs in float32, and use
    `Reversible(beta, state_dtype="exact")` for solves deeper than a handful of steps or
    `beta` near 1: its reversal is exact to the bit at any depth, so the gradient equals
    the unrolled gradient of the forward pass (see [`revdeq_jax.ExactState`][]).

    Cotangents are returned for every floating array closed over by `fn` (its parameters),
    for `args` and for `z0`. Only reversible solvers are accepted.

    **Arguments:**

    - `report`: optional debugging hook, called (through `jax.debug.callback`, so it also
      works under `jit`) after every backward pass with a dict of the reconstruction error
      measured for free at the end of the reversed loop: `"abs"`, the largest deviation of
      the rebuilt $(y_0, z_0)$ from the true initial state, and `"rel"`, that over
      $\max(\max|z_0|, 1)$ (per example under `vmap`). Zero means the gradient equals the
      unrolled gradient; see also [`revdeq_jax.reconstruction_error`][].

    ??? cite "References"

        ```bibtex
        @article{mccallum2025reversible,
            title={Reversible Deep Equilibrium Models},
            author={McCallum, Sam and Arora, Kamran and Foster, James},
            journal={arXiv:2509.12917},
            year={2025}
        }
        ```
    """

    report: Callable[[dict[str, Array]], None] | None = eqx.field(default=None, static=True)

    def check(self, solver: AbstractSolver) -> None:
        if not isinstance(solver, AbstractReversibleSolver):
            raise ValueError(
                f"`ReversibleAdjoint` can only differentiate a reversible solver, but got "
                f"`solver={type(solver).__name__}(...)`. Use `solver=Reversible(beta)`, or "
                "pick another adjoint for this solver: `ImplicitAdjoint()` (classic DEQ "
                "gradient), `UnrolledAdjoint()` or `CheckpointAdjoint()` (exact, memory "
                "grows with steps)."
            )

    def apply(
        self,
        primal: Callable[..., LoopResult],
        fn: Fn,
        solver: AbstractSolver,
        z0: Z,
        args: Args,
        *,
        max_steps: int,
        tol: float,
    ) -> LoopResult:
        self.check(solver)
        del primal  # the forward loop is `iterate(kind="lax")`, inside the custom VJP
        out = _reversible_solve((fn, args, z0), solver, max_steps, tol, self.report)
        return eqx.tree_at(lambda r: r.residual, out, jax.lax.stop_gradient(out.residual))


def _forward(inputs, solver, max_steps, tol) -> LoopResult:
    fn, args, z0 = inputs
    return iterate(fn, solver, z0, args, max_steps=max_steps, tol=tol, kind="lax")


@eqx.filter_custom_vjp
def _reversible_solve(inputs, solver, max_steps, tol, report):
    del report
    return eqx.tree_at(lambda r: r.state, _forward(inputs, solver, max_steps, tol), None)


@_reversible_solve.def_fwd
def _reversible_solve_fwd(perturbed, inputs, solver, max_steps, tol, report):
    del perturbed, report
    out = _forward(inputs, solver, max_steps, tol)
    y, z = solver.coupled(out.state)
    return eqx.tree_at(lambda r: r.state, out, None), (y, z, out.num_steps)


@_reversible_solve.def_bwd
def _reversible_solve_bwd(residuals, grad_out, perturbed, inputs, solver, max_steps, tol, report):
    del perturbed, max_steps, tol
    y_n, z_n, num_steps = residuals
    fn, args, z0 = inputs
    value_bar = materialise(grad_out.value, z0)
    del grad_out, residuals  # the residual's cotangent is ignored: it is a statistic
    y_0, z_0, _, _, z0_bar, fn_bar, args_bar = reverse_loop(
        solver, fn, args, z0, y_n, z_n, num_steps, value_bar
    )
    if report is not None:
        with state_scope(solver.state_dtype):
            deviation = initial_state_deviation(solver, y_0, z_0, z0)
        jax.debug.callback(report, deviation)
    return fn_bar, args_bar, z0_bar


def initial_state_deviation(solver, y_0, z_0, z0) -> dict[str, Array]:
    """How far a reconstructed `(y_0, z_0)` lies from the true initial state `z0`."""
    err = jnp.zeros((), jnp.float32)
    scale = jnp.ones((), jnp.float32)
    dy = jtu.tree_leaves(solver.deviation(y_0, z0))
    dz = jtu.tree_leaves(solver.deviation(z_0, z0))
    for a, b, c in zip(dy, dz, jtu.tree_leaves(z0)):
        dev = jnp.maximum(jnp.max(jnp.abs(a)), jnp.max(jnp.abs(b)))
        # XLA's max-reduction may drop NaNs (measured on CPU for >= 4096 elements), so an
        # overflowed reconstruction is flagged explicitly.
        finite = jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))
        dev = jnp.where(finite, dev, jnp.inf)
        err = jnp.maximum(err, dev.astype(jnp.float32))
        scale = jnp.maximum(scale, jnp.max(jnp.abs(c)).astype(jnp.float32))
    return {"abs": err, "rel": err / scale}


def reverse_loop(solver, fn, args, z0, y_n, z_n, num_steps, value_bar):
    """Algorithm 1: walks `num_steps` steps back from `(y_n, z_n)`.

    Returns the reconstructed `(y_0, z_0)`, their cotangents, the cotangent of `z0`
    (cast to its dtype) and the accumulated cotangents of `fn` and `args`.
    """
    with state_scope(solver.state_dtype):
        y_bar, z_bar = solver.init_cotangents(value_bar, y_n)
        fn_bar = zeros_like_inexact(fn)
        args_bar = zeros_like_inexact(args)

        def _cond(carry):
            return carry[0] > 0

        def _body(carry):
            n, y, z, y_bar, z_bar, params_bar = carry
            y, z, y_bar, z_bar, params_bar = solver.backward_step(
                fn, args, y, z, y_bar, z_bar, params_bar, z0
            )
            return n - 1, y, z, y_bar, z_bar, params_bar

        init = (num_steps, y_n, z_n, y_bar, z_bar, (fn_bar, args_bar))
        _, y_0, z_0, y_bar, z_bar, (fn_bar, args_bar) = jax.lax.while_loop(_cond, _body, init)
        # y_0 = z_0 = z0, so both cotangents flow into the initial guess.
        z0_bar = tree_cast_like(tree_add(z_bar, y_bar), z0)
        return y_0, z_0, y_bar, z_bar, z0_bar, fn_bar, args_bar
