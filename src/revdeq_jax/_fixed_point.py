"""The one entry point: `fixed_point`."""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._adjoint.base import AbstractAdjoint
from ._adjoint.reversible import initial_state_deviation, ReversibleAdjoint
from ._custom_types import Args, Fn, Z
from ._iterate import iterate
from ._precision import check_state_dtype_for, state_scope, UserFn, x64_enabled
from ._solution import classify, RESULTS, Solution
from ._solver.base import AbstractReversibleSolver, AbstractSolver
from ._solver.reversible import Reversible


def check_options(solver, adjoint, max_steps, tol) -> None:
    """Trace-time checks of the options shared by every entry point."""
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"`solver` must be a revdeq_jax solver such as `Reversible(beta=0.5)`, got {solver!r}."
        )
    if adjoint is not None and not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be a revdeq_jax adjoint such as `ReversibleAdjoint()`, got "
            f"{adjoint!r}."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral):
        raise TypeError(f"`max_steps` must be a Python int, got {type(max_steps).__name__}.")
    if max_steps < 1:
        raise ValueError(f"`max_steps={max_steps}` must be at least 1.")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"`tol` must be a Python float, got {type(tol).__name__}.")
    if not tol >= 0:
        raise ValueError(
            f"`tol={tol}` must be >= 0 (a relative residual); `tol=0` runs exactly "
            "`max_steps` steps."
        )


def prepare(fn: Fn, z0: Z, args: Args, solver: AbstractSolver) -> tuple[UserFn, Z]:
    """Checks `z0` and `fn`'s output against each other, and closure-converts `fn`.

    Closure conversion makes every array `fn` closes over (e.g. the parameters of a layer
    built inside a traced function) an explicit leaf, so custom gradient rules can return
    cotangents for it.
    """
    z0 = jtu.tree_map(jnp.asarray, z0)
    leaves = jtu.tree_leaves(z0)
    if not leaves:
        raise ValueError("`z0` has no array leaves: there is nothing to solve for.")
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(
                f"`z0` must hold real floating arrays, but has a leaf of dtype "
                f"{leaf.dtype}. Cast it, e.g. `z0.astype(jnp.float32)`."
            )
    out = jax.eval_shape(lambda z, a: fn(z, a), z0, args)
    in_struct = jax.eval_shape(lambda: z0)
    if jtu.tree_structure(out) != jtu.tree_structure(in_struct):
        raise ValueError(
            "`fn(z, args)` must return the same PyTree structure as `z0`, but `z0` is "
            f"{jtu.tree_structure(in_struct)} and `fn` returned {jtu.tree_structure(out)}."
        )
    for (path, o), i in zip(jtu.tree_leaves_with_path(out), jtu.tree_leaves(in_struct)):
        if o.shape != i.shape or o.dtype != i.dtype:
            raise ValueError(
                f"`fn(z, args)` must return arrays with the shapes and dtypes of `z0`, but "
                f"at {jtu.keystr(path) or 'the root'} `z0` is {i.dtype}{list(i.shape)} "
                f"and `fn` returned {o.dtype}{list(o.shape)}."
            )
    # Through a plain function: some callables (e.g. `eqx.filter_vmap(layer)`) cannot be
    # closure-converted directly, while every array they hold is still found this way.
    fn = eqx.filter_closure_convert(lambda z, a: fn(z, a), z0, args)
    return UserFn(fn, x64_enabled()), z0


@eqx.filter_jit
def fixed_point(
    fn: Fn,
    z0: Z,
    args: Args = None,
    *,
    solver: AbstractSolver = Reversible(beta=0.5),
    adjoint: AbstractAdjoint = ReversibleAdjoint(),
    max_steps: int = 8,
    tol: float = 1e-3,
    throw: bool = False,
) -> Solution:
    r"""Finds $z^* = f(z^*, x)$ and makes it differentiable.

    **Arguments:**

    - `fn`: the function, called as `fn(z, args)`; returns a PyTree with the structure,
      shapes and dtypes of `z0`. It may be an `eqx.Module` or close over arrays: gradients
      flow to every floating array it holds.
    - `z0`: the initial guess, a PyTree of floating arrays (zeros are usual).
    - `args`: anything else `fn` needs, e.g. the input injection $x$. Differentiable.
    - `solver`: a solver, e.g. [`revdeq_jax.Reversible`][] (the default, `beta=0.5`),
      [`revdeq_jax.Anderson`][].
    - `adjoint`: how to differentiate, e.g. [`revdeq_jax.ReversibleAdjoint`][] (the
      default: exact, constant memory), [`revdeq_jax.UnrolledAdjoint`][],
      [`revdeq_jax.ImplicitAdjoint`][].
    - `max_steps`: the most solver steps to take (each step of `Reversible` evaluates `fn`
      twice).
    - `tol`: stop once the relative residual $\|f(z) - z\| / \|f(z)\|$ is below `tol`;
      `tol=0` always takes `max_steps` steps.
    - `throw`: raise a runtime error (via `eqx.error_if`) if the iteration produced a
      non-finite value. Hitting `max_steps` is reported in `sol.result` but never raised:
      DEQs are usually run on a step budget.

    **Returns:** a [`revdeq_jax.Solution`][].

    Acts on whatever it is given; under `jax.vmap` each example stops on its own residual
    and gets its own `num_steps`, `residual` and `result`.
    """
    check_options(solver, adjoint, max_steps, tol)
    if not isinstance(throw, bool):
        raise TypeError(f"`throw` must be a bool, got {throw!r}.")
    fn, z0 = prepare(fn, z0, args, solver)
    solver = solver.specialise(z0)
    check_state_dtype_for(solver.state_dtype, z0)
    adjoint.check(solver)
    out = adjoint.apply(iterate, fn, solver, z0, args, max_steps=max_steps, tol=tol)
    result = classify(out.converged, out.finite, tol)
    value = out.value
    if throw:
        value = result.error_if(value, result == RESULTS.nonfinite)
    return Solution(
        value=value,
        num_steps=out.num_steps,
        residual=out.residual,
        nfe=out.nfe,
        result=result,
        max_steps=max_steps,
    )


@eqx.filter_jit
def reconstruction_error(
    fn: Fn,
    z0: Z,
    args: Args = None,
    *,
    solver: Reversible = Reversible(beta=0.5),
    max_steps: int = 8,
    tol: float = 1e-3,
) -> PyTree:
    r"""How exactly the reversible solver rebuilds its start from its end.

    Runs the forward solve, then inverts every step from the final $(y_N, z_N)$ with the
    same arithmetic [`revdeq_jax.ReversibleAdjoint`][] uses on its backward pass, and
    compares the reconstructed $(y_0, z_0)$ with the true initial state. Zero means the
    reversible gradient equals the gradient of the unrolled computation; a large value
    means the reversible gradient has drifted from it (the error grows geometrically with
    the number of steps).

    **Returns:** a dict of scalars: `"abs"`, the largest absolute deviation over $y_0$ and
    $z_0$; `"rel"`, that divided by $\max(\max|z_0|, 1)$; and `"num_steps"`.
    """
    check_options(solver, None, max_steps, tol)
    if not isinstance(solver, AbstractReversibleSolver):
        raise ValueError(
            "`reconstruction_error` needs a reversible solver such as "
            f"`Reversible(beta)`, got `{type(solver).__name__}`."
        )
    fn, z0 = prepare(fn, z0, args, solver)
    solver = solver.specialise(z0)
    check_state_dtype_for(solver.state_dtype, z0)
    out = iterate(fn, solver, z0, args, max_steps=max_steps, tol=tol, kind="lax")
    with state_scope(solver.state_dtype):
        y, z = solver.coupled(out.state)

        def _body(carry):
            n, y, z = carry
            y, z = solver.reverse_step(fn, args, y, z, z0)
            return n - 1, y, z

        _, y, z = jax.lax.while_loop(lambda c: c[0] > 0, _body, (out.num_steps, y, z))
        return {**initial_state_deviation(solver, y, z, z0), "num_steps": out.num_steps}
