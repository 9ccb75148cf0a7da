"""The one loop that drives every solver. Adjoints choose how it is run and differentiated."""

from typing import Any, Literal

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._custom_types import Args, Fn, Z
from ._misc import relative_residual
from ._precision import state_scope
from ._solver.base import AbstractSolver


LoopKind = Literal["lax", "unrolled", "checkpointed"]


class LoopResult(eqx.Module):
    """What a run of the loop produced, before it is dressed up as a `Solution`."""

    value: PyTree
    num_steps: Int[Array, ""]
    residual: Float[Array, ""]
    converged: Bool[Array, ""]
    finite: Bool[Array, ""]
    nfe: Int[Array, ""]
    state: Any = None  # the final solver state; dropped before leaving custom VJPs


def residual_of(solver: AbstractSolver, state) -> tuple[Array, Array]:
    """Relative residual of the current iterate, and whether it is finite."""
    z, fz = solver.current(state)
    res = relative_residual(z, fz)
    return res, jnp.isfinite(res)


def iterate(
    fn: Fn,
    solver: AbstractSolver,
    z0: Z,
    args: Args,
    *,
    max_steps: int,
    tol: float,
    kind: LoopKind,
) -> LoopResult:
    """Runs `solver` from `z0` until the relative residual drops below `tol` (never, if
    `tol == 0`), a non-finite value appears, or `max_steps` steps are taken.

    `kind` picks the loop: `"lax"` (`lax.while_loop`, not reverse-differentiable),
    `"unrolled"` (a `lax.scan` over `max_steps` whose steps after stopping are masked out,
    so reverse-mode autodiff stores every step) or `"checkpointed"` (Equinox's
    checkpointed while loop).
    """
    solver = solver.with_max_steps(max_steps)
    with state_scope(solver.state_dtype):
        state0 = solver.init(fn, z0, args)
        n0 = jnp.zeros((), jnp.int32)

        def _keep_going(state):
            res, finite = residual_of(solver, state)
            return finite & ~(res < tol)

        def _cond(carry):
            n, state = carry
            return (n < max_steps) & _keep_going(state)

        def _body(carry):
            n, state = carry
            return n + 1, solver.step(fn, state, args)

        if kind == "lax":
            n, state = jax.lax.while_loop(_cond, _body, (n0, state0))
        elif kind == "checkpointed":
            n, state = eqxi.while_loop(
                _cond, _body, (n0, state0), max_steps=max_steps, kind="checkpointed"
            )
        elif kind == "unrolled":

            def _scan_body(carry, _):
                n, state = carry
                active = _keep_going(state)
                new_state = solver.step(fn, state, args)
                dynamic_new, static = eqx.partition(new_state, eqx.is_array)
                dynamic_old, _ = eqx.partition(state, eqx.is_array)
                dynamic = jtu.tree_map(
                    lambda a, b: jnp.where(active, a, b), dynamic_new, dynamic_old
                )
                return (n + active.astype(jnp.int32), eqx.combine(dynamic, static)), None

            (n, state), _ = jax.lax.scan(_scan_body, (n0, state0), None, length=max_steps)
        else:
            raise ValueError(f"Unknown loop kind {kind!r}.")

        res, finite = residual_of(solver, state)
        value, _ = solver.current(state)
        nfe = 1 + solver.nfe_per_step * n
        return LoopResult(
            value=value,
            num_steps=n,
            residual=res.astype(jnp.float32),
            converged=res < tol,
            finite=finite,
            nfe=nfe.astype(jnp.int32),
            state=state,
        )
