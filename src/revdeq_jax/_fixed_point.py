"""The one entry point: `fixed_point`."""

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._adjoint.base import AbstractAdjoint
from ._adjoint.implicit import ImplicitAdjoint
from ._adjoint.reversible import ReversibleAdjoint
from ._custom_types import Args, Fn, IntScalar, StepBudget, Z
from ._iterate import BoundIterate, check_tolerances, has_stopping_test
from ._misc import check_self_map
from ._precision import UserFn
from ._solution import classify, RESULTS, Solution
from ._solver.base import AbstractReversibleSolver, AbstractSolver
from ._solver.reversible import Reversible
from ._state import x64_enabled


def check_options(
    solver, adjoint, max_steps, rtol=None, atol=None, tol=None, *, owner="fixed_point"
) -> tuple[float, float]:
    """Trace-time checks of the options shared by every entry point.

    **Returns:** the resolved `(rtol, atol)` (see `check_tolerances`).
    """
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
    return check_tolerances(rtol, atol, tol, default_rtol=DEFAULT_RTOL, owner=owner)


def check_step_budget(
    step_budget: object,  # anything: this is the check that it is an integer scalar
    max_steps: int,
    *,
    owner: str = "fixed_point",
) -> IntScalar | None:
    """Trace-time checks of a runtime step budget, and the int32 scalar it becomes,
    clamped to `[0, max_steps]`.

    A Python int is static, so it is checked against the range here; an array's value is
    only known at run time, so it is clamped (a budget above the ceiling runs
    `max_steps` steps, a negative one none).
    """
    if step_budget is None:
        return None
    hint = (
        f"Pass an integer scalar array, e.g. `{owner}(..., step_budget=jnp.asarray(4))`"
        " (its value can then change without recompiling)"
    )
    if isinstance(step_budget, bool) or (
        eqx.is_array(step_budget) and step_budget.dtype == jnp.bool_
    ):
        raise TypeError(f"`step_budget` must be an integer, got a bool. {hint}.")
    if isinstance(step_budget, numbers.Integral):
        if not 0 <= step_budget <= max_steps:
            raise ValueError(
                f"`step_budget={step_budget}` must lie in [0, max_steps={max_steps}]: "
                "`max_steps` is the compiled ceiling of the loop. Raise `max_steps` to "
                "allow larger budgets (an array budget above it is clamped)."
            )
        return jnp.asarray(step_budget, jnp.int32)
    if not eqx.is_array(step_budget):
        raise TypeError(
            f"`step_budget` must be an int or an integer scalar array, got "
            f"{type(step_budget).__name__}. {hint}."
        )
    if not jnp.issubdtype(step_budget.dtype, jnp.integer):
        raise TypeError(
            f"`step_budget` must have an integer dtype, got {step_budget.dtype}: a step "
            f"count is not rounded for you. {hint}, or cast it with "
            "`.astype(jnp.int32)`."
        )
    if step_budget.shape != ():
        raise ValueError(
            f"`step_budget` must be a scalar, got shape {step_budget.shape}. For one "
            "budget per example, `jax.vmap` the solve over the budgets: inside it each "
            "example's budget is a scalar."
        )
    budget = jnp.asarray(step_budget)
    if budget.dtype.itemsize < 4:
        budget = budget.astype(jnp.int32)  # exact; and `max_steps` may not fit in int8
    # Clamp in the budget's own dtype (an int64 or uint32 above 2**31 stays large), then
    # narrow: the result lies in [0, max_steps], which int32 holds.
    return jnp.clip(budget, 0, max_steps).astype(jnp.int32)


def _check_fn(fn: Fn, z0: Z, args: Args) -> tuple[UserFn, Z]:
    """Checks `z0` and `fn`'s output against each other, and closure-converts `fn`.

    Closure conversion makes every array `fn` closes over (e.g. the parameters of a layer
    built inside a traced function) an explicit leaf, so custom gradient rules can return
    cotangents for it.
    """
    z0 = jtu.tree_map(jnp.asarray, z0)
    check_self_map(fn, z0, args, name="z0", empty="there is nothing to solve for.")
    # Through a plain function: some callables (e.g. `eqx.filter_vmap(layer)`) cannot be
    # closure-converted directly, while every array they hold is still found this way.
    fn = eqx.filter_closure_convert(lambda z, a: fn(z, a), z0, args)
    return UserFn(fn, x64_enabled()), z0


DEFAULT_RTOL = 1e-3


def default_adjoint(solver: AbstractSolver) -> AbstractAdjoint:
    """The adjoint used when none is named: [`revdeq_jax.ReversibleAdjoint`][] for a
    reversible solver, [`revdeq_jax.ImplicitAdjoint`][] (the classic DEQ gradient) for
    any other."""
    if isinstance(solver, AbstractReversibleSolver):
        return ReversibleAdjoint()
    return ImplicitAdjoint()


def setup(
    fn: Fn,
    z0: Z,
    args: Args,
    solver: AbstractSolver,
    adjoint: AbstractAdjoint | None,
    max_steps: int,
    rtol: float | None,
    atol: float | None,
    tol: float | None,
) -> tuple[UserFn, Z, AbstractSolver, float, float]:
    """Everything `fixed_point` does before solving, once: option checks, `fn` against
    `z0`, closure conversion, and the solver prepared for `z0` and `max_steps` (the one
    object the forward and the backward pass both use).

    **Returns:** `(fn, z0, solver, rtol, atol)`.
    """
    rtol, atol = check_options(solver, adjoint, max_steps, rtol, atol, tol)
    fn, z0 = _check_fn(fn, z0, args)
    differentiable = adjoint is not None and adjoint.differentiates_solver
    solver = solver.prepare(z0, max_steps, differentiable=differentiable)
    if adjoint is not None:
        adjoint.check(solver)
    return fn, z0, solver, rtol, atol


@eqx.filter_jit
def fixed_point(
    fn: Fn,
    z0: Z,
    args: Args = None,
    *,
    solver: AbstractSolver = Reversible(beta=0.5),
    adjoint: AbstractAdjoint | None = None,
    max_steps: int = 8,
    rtol: float | None = None,
    atol: float = 0.0,
    tol: float | None = None,
    throw: bool = False,
    step_budget: StepBudget | None = None,
) -> Solution:
    r"""Finds $z^* = f(z^*, x)$ and makes it differentiable.

    **Arguments:**

    - `fn`: the function, called as `fn(z, args)`; returns a PyTree with the structure,
      shapes and dtypes of `z0`. It may be an `eqx.Module` or close over arrays: gradients
      flow to every floating array it holds.
    - `z0`: the initial guess, a PyTree of floating arrays (zeros are usual).
    - `args`: anything else `fn` needs, e.g. the input injection $x$ or a whole model:
      any PyTree. Gradients flow to its floating arrays; every other leaf (functions,
      strings, ints, integer arrays) is treated as static.
    - `solver`: a solver, e.g. [`revdeq_jax.Reversible`][] (the default, `beta=0.5`,
      with the exact state for a float32 `z0`), [`revdeq_jax.Anderson`][].
    - `adjoint`: how to differentiate, e.g. [`revdeq_jax.ReversibleAdjoint`][] (exact,
      memory constant in the iterates), [`revdeq_jax.UnrolledAdjoint`][],
      [`revdeq_jax.ImplicitAdjoint`][]. `None` (the default): `ReversibleAdjoint()` for a
      reversible solver, `ImplicitAdjoint()` for any other.
    - `max_steps`: the most solver steps to take (each step of `Reversible` evaluates `fn`
      twice). Static: it sizes the compiled loop (and the exact state's buffer, the
      unrolled scan, the checkpointing schedule).
    - `rtol`, `atol`: stop once

        $\|f(z) - z\|_\mathrm{rms} \le \mathrm{atol} + \mathrm{rtol}\,\|f(z)\|_\mathrm{rms}$,

      with $\|v\|_\mathrm{rms} = \|v\|_2 / \sqrt{n}$ over all $n$ elements of all
      leaves (so `atol` does not depend on the size of the state, and `rtol` bounds the
      relative residual $\|f(z) - z\|_2 / \|f(z)\|_2$). Defaults `rtol=1e-3`,
      `atol=0`. A fixed point at or near 0 needs `atol > 0`: there the relative
      residual does not fall as $z$ converges. `rtol=atol=0` always takes `max_steps`
      steps.
    - `tol`: another name for `rtol` (the name the RevDEQ paper uses); pass one of the
      two.
    - `throw`: raise a runtime error (via `eqx.error_if`) if the iteration produced a
      non-finite value. Hitting `max_steps` is reported in `sol.result` but never raised:
      DEQs are usually run on a step budget.
    - `step_budget`: a runtime limit on the number of steps, at most `max_steps`: an
      integer scalar array (any integer dtype), whose value may change from call to
      call *without recompiling*; `None` (the default) means `max_steps`. The solve
      stops after `min(step_budget, max_steps)` steps or earlier by the tolerances, and
      is then the solve compiled with `max_steps=step_budget`, for every solver and
      adjoint: the same `num_steps`, and the same value and gradient (to the bit with
      the reversible, implicit and phantom adjoints; within a few ulps with
      `UnrolledAdjoint`/`CheckpointAdjoint`, whose loop of `max_steps` steps XLA may
      compile differently). The reversible adjoint reverses the steps actually taken;
      `UnrolledAdjoint` still pays for `max_steps` masked steps.
      An array budget is clamped to `[0, max_steps]`; a Python int is static (each
      value compiles anew) and must lie in that range. 0 takes no step and returns
      `z0`. Under `jax.vmap` it may be batched: one budget per example.

    **Returns:** a [`revdeq_jax.Solution`][].

    Acts on whatever it is given; under `jax.vmap` each example stops on its own residual
    and gets its own `num_steps`, `residual` and `result`.
    """
    if not isinstance(throw, bool):
        raise TypeError(f"`throw` must be a bool, got {throw!r}.")
    adjoint = default_adjoint(solver) if adjoint is None else adjoint
    fn, z0, solver, rtol, atol = setup(fn, z0, args, solver, adjoint, max_steps, rtol, atol, tol)
    step_budget = check_step_budget(step_budget, max_steps)  # after `max_steps` is checked
    primal = BoundIterate(solver, max_steps, rtol, atol, step_budget)
    out = adjoint.apply(primal, (fn, args, z0), solver)
    result = classify(out.converged, out.finite, has_stopping_test(rtol, atol))
    value = out.value
    if throw:
        value = result.error_if(value, result == RESULTS.nonfinite)
    return Solution(
        value=value,
        num_steps=out.num_steps,
        residual=jax.lax.stop_gradient(out.residual),
        abs_residual=jax.lax.stop_gradient(out.abs_residual),
        nfe=out.nfe,
        result=result,
        max_steps=max_steps,
    )


def reconstruction_error(
    fn: Fn,
    z0: Z,
    args: Args = None,
    *,
    solver: AbstractReversibleSolver = Reversible(beta=0.5),
    max_steps: int = 8,
    rtol: float | None = None,
    atol: float = 0.0,
    tol: float | None = None,
) -> dict[str, np.ndarray]:
    r"""How exactly a reversible backward pass rebuilds its start from its end.

    Compiles and runs one gradient of a [`revdeq_jax.fixed_point`][] solve with
    [`revdeq_jax.ReversibleAdjoint`][] (the real backward pass, with its re-evaluations of
    `fn`), and returns what that backward pass measured when it compared its
    reconstructed $(y_0, z_0)$ with the true initial state. Zero means the reversible
    gradient equals the gradient of the unrolled computation; a large value means it
    has drifted (geometrically with the number of steps, for floating states).

    !!! warning

        This is a program of its own. Your training step is another, which XLA may
        compile differently; the check that watches *it* is the one
        `ReversibleAdjoint(on_mismatch=..., report=...)` makes on every backward pass.
        Call this function outside `jit`.

    **Returns:** a dict of scalars (arrays of per-example values under `vmap`): `"abs"`,
    the largest absolute deviation over $y_0$ and $z_0$; `"rel"`, that divided by
    $\max(\max|z_0|, 1)$; `"drift"` (the exact state's largest re-evaluation drift, in
    ulps; see [`revdeq_jax.ReversibleAdjoint`][]);
    `"mismatch"`; and `"num_steps"`.
    """
    rtol, atol = check_options(
        solver, None, max_steps, rtol, atol, tol, owner="reconstruction_error"
    )
    if not isinstance(solver, AbstractReversibleSolver):
        raise ValueError(
            "`reconstruction_error` needs a reversible solver such as "
            f"`Reversible(beta)`, got `{type(solver).__name__}`."
        )
    reports = []
    adjoint = ReversibleAdjoint(on_mismatch="ignore", report=reports.append)

    def _loss(z0):
        sol = fixed_point(
            fn,
            z0,
            args,
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            rtol=rtol,
            atol=atol,
        )
        total = sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jtu.tree_leaves(sol.value))
        return total, sol.num_steps

    z0 = jtu.tree_map(jnp.asarray, z0)
    _, num_steps = jax.jit(jax.grad(_loss, has_aux=True))(z0)
    jax.effects_barrier()
    report = {k: np.asarray(v) for k, v in reports[-1].items()}
    return {**report, "num_steps": np.asarray(num_steps)}
