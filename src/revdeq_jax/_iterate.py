"""The one loop that drives every solver, and the loops an adjoint may run it with.

`iterate` is the primal computation. It is written once; an adjoint decides how it is
run and differentiated by handing it a `while_loop`: `lax_while_loop` (not
reverse-differentiable, constant memory), `unrolled_while_loop` (a masked `lax.scan`
that reverse-mode autodiff stores step by step) or `checkpointed_while_loop` (Equinox's
online recursive checkpointing).
"""

from collections.abc import Callable
from typing import Any, TypeAlias

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._custom_types import Args, Fn, Z
from ._misc import relative_residual
from ._solver.base import AbstractSolver


Inputs: TypeAlias = tuple[Fn, Args, Z]  # (fn, args, z0): what gradients flow to
WhileLoop: TypeAlias = Callable[..., Any]  # (cond, body, init, *, max_steps) -> carry


def lax_while_loop(cond, body, init, *, max_steps: int):
    """`lax.while_loop`: stops as soon as `cond` fails; forward-mode autodiff only."""
    del max_steps
    return jax.lax.while_loop(cond, body, init)


def unrolled_while_loop(cond, body, init, *, max_steps: int):
    """A `lax.scan` over `max_steps` steps, those after `cond` fails masked out: the
    value of `lax_while_loop`, and reverse-mode autodiff stores every step."""

    def _step(carry, _):
        active = cond(carry)
        new = body(carry)
        return jtu.tree_map(lambda a, b: jnp.where(active, a, b), new, carry), None

    out, _ = jax.lax.scan(_step, init, None, length=max_steps)
    return out


def checkpointed_while_loop(cond, body, init, *, max_steps: int):
    """Equinox's checkpointed while loop: reverse-differentiable in O(log max_steps)
    memory, recomputing steps on the backward pass."""
    return eqxi.while_loop(cond, body, init, max_steps=max_steps, kind="checkpointed")


class LoopResult(eqx.Module):
    """What a run of the loop produced, before it is dressed up as a `Solution`."""

    value: PyTree
    num_steps: Int[Array, ""]
    residual: Float[Array, ""]
    converged: Bool[Array, ""]
    finite: Bool[Array, ""]
    nfe: Int[Array, ""]
    state: Any = None  # the final solver state; dropped before leaving custom VJPs


def _residual(solver: AbstractSolver, state) -> tuple[Array, Array]:
    """Relative residual of the current iterate, and whether it is finite."""
    z, fz = solver.current(state)
    res = relative_residual(z, fz)
    return res, jnp.isfinite(res)


def iterate(
    inputs: Inputs,
    while_loop: WhileLoop,
    *,
    solver: AbstractSolver,
    max_steps: int,
    tol: float,
) -> LoopResult:
    """Runs `solver` from `z0` until the relative residual drops below `tol` (never, if
    `tol == 0`), a non-finite value appears, or `max_steps` steps are taken.

    `inputs = (fn, args, z0)`; `solver` must already be prepared
    (`solver.prepare(z0, max_steps)`).
    """
    fn, args, z0 = inputs
    with solver.scope():
        state0 = solver.init(fn, z0, args)

        def _cond(carry):
            n, state = carry
            res, finite = _residual(solver, state)
            return (n < max_steps) & finite & ~(res < tol)

        def _body(carry):
            n, state = carry
            return n + 1, solver.step(fn, state, args)

        init = (jnp.zeros((), jnp.int32), state0)
        n, state = while_loop(_cond, _body, init, max_steps=max_steps)
        res, finite = _residual(solver, state)
        value, _ = solver.current(state)
        return LoopResult(
            value=value,
            num_steps=n,
            residual=res.astype(jnp.float32),
            converged=res < tol,
            finite=finite,
            nfe=(1 + solver.nfe_per_step * n).astype(jnp.int32),
            state=state,
        )
