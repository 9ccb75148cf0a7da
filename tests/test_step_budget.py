"""The runtime step budget: `fixed_point(..., max_steps=M, step_budget=b)`.

A budget `b <= M` must give the solve compiled with `max_steps=b` (value, `num_steps`,
residual, NFE, result and gradient) for every solver and every adjoint that accepts it,
while changing `b` between calls reuses one compiled program.
"""

import dataclasses
import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import revdeq_jax as rdeq
from revdeq_jax._fixed_point import check_step_budget


DIM = 5
CEILING = 6  # the static `max_steps` of every budgeted solve here
TOL = 1e-5  # loose enough that some solvers stop before the ceiling, tight enough that
# none stops before 2 steps: both budgets below are exercised
BUDGETS = (2, CEILING)


class _TanhBlock(eqx.Module):
    """f(z, x) = 0.8 tanh(W z + x) + c, a contraction (||W||_2 = 0.9): not tests/helpers.py's.

    With `tree=True` the state is a dict `{"a": (3,), "b": (2,)}` mixed through the same
    matrix, so every leaf depends on every other.
    """

    w: jax.Array
    c: jax.Array
    tree: bool = eqx.field(static=True)

    def __init__(self, *, tree: bool, key):
        k1, k2 = jr.split(key)
        w = jr.normal(k1, (DIM, DIM))
        self.w = 0.9 * w / jnp.linalg.norm(w, 2)
        self.c = 0.1 * jr.normal(k2, (DIM,))
        self.tree = tree

    def __call__(self, z, x):
        v = jnp.concatenate([z["a"], z["b"]]) if self.tree else z
        out = 0.8 * jnp.tanh(self.w @ v + x) + self.c
        return {"a": out[:3], "b": out[3:]} if self.tree else out


def _z0(tree: bool):
    z0 = 0.1 * jnp.arange(DIM, dtype=jnp.float32)
    return {"a": z0[:3], "b": z0[3:]} if tree else z0


def _solve_and_grad(block, x, z0, *, solver, adjoint, max_steps, step_budget):
    """Everything a solve reports, and the gradient of a weighted sum of its value with
    respect to the block's parameters, `x` and `z0`."""

    def _loss(params, x, z0):
        sol = rdeq.fixed_point(
            params,
            z0,
            x,
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            tol=TOL,
            step_budget=step_budget,
        )
        weights = jtu.tree_map(lambda v: jnp.linspace(0.5, 1.5, v.size).reshape(v.shape), z0)
        total = sum(
            jnp.sum(w * v) for w, v in zip(jtu.tree_leaves(weights), jtu.tree_leaves(sol.value))
        )
        stats = (sol.value, sol.num_steps, sol.residual, sol.nfe, sol.result._value)
        return total, stats

    grads, stats = eqx.filter_grad(_loss, has_aux=True)(block, x, z0)
    return stats, grads


EXACT = rdeq.Reversible(beta=0.5, state_dtype="exact")
FLOAT64 = rdeq.Reversible(beta=0.5, state_dtype=jnp.float64)
ALL_ADJOINTS = {
    "reversible": rdeq.ReversibleAdjoint(),
    "unrolled": rdeq.UnrolledAdjoint(),
    "checkpoint": rdeq.CheckpointAdjoint(),
    "implicit": rdeq.ImplicitAdjoint(),
    "phantom": rdeq.PhantomAdjoint(steps=2, damping=0.8),
}
# Every solver with every adjoint that accepts it: the exact state has no derivative for
# autodiff to take (`UnrolledAdjoint`/`CheckpointAdjoint` refuse it), and only a
# reversible solver can be reversed. Each case compiles three gradient programs (a few
# seconds for the exact state), so the default run takes a subset that still has every
# solver, every adjoint and both state structures; `-m slow` runs all of them.
_PAIRS = [
    ("exact", EXACT, "reversible"),
    ("exact", EXACT, "implicit"),
    ("exact", EXACT, "phantom"),
    # Not float64 + CheckpointAdjoint: outside global x64 that pair fails with and without
    # a budget (Equinox's checkpointed loop allocates its float64/int64 checkpoint buffers
    # outside the solver's x64 scope: JAX truncates them, then an assertion fails).
    *[("float64", FLOAT64, a) for a in ALL_ADJOINTS if a != "checkpoint"],
    *[
        (name, solver, a)
        for name, solver in (
            ("picard", rdeq.Picard()),
            ("relaxed", rdeq.Relaxed(beta=0.7)),
            ("anderson", rdeq.Anderson(m=3)),
            ("broyden", rdeq.Broyden(m=4)),
        )
        for a in ("unrolled", "checkpoint", "implicit", "phantom")
    ],
]
_FAST = {  # the cheapest to compile of each solver and adjoint, and one PyTree state
    ("exact", "reversible", False),
    ("float64", "unrolled", False),
    ("picard", "unrolled", True),
    ("relaxed", "checkpoint", False),
    ("anderson", "implicit", False),
    ("broyden", "phantom", False),
}


def _case(name, solver, adjoint, tree):
    marks = [] if (name, adjoint, tree) in _FAST else [pytest.mark.slow]
    structure = "dict" if tree else "array"
    return pytest.param(
        name, solver, adjoint, tree, marks=marks, id=f"{name}-{adjoint}-{structure}"
    )


CASES = [_case(*pair, tree) for pair in _PAIRS for tree in (False, True)]


@pytest.mark.parametrize("solver_name, solver, adjoint_name, tree", CASES)
def test_budget_equals_max_steps(solver_name, solver, adjoint_name, tree, getkey):
    """Budget `b` under the ceiling == the solve compiled with `max_steps=b`.

    `num_steps`, NFE and the result code are always equal. Value, residual and gradient
    are equal to the bit for the adjoints that do not differentiate the loop itself
    (reversible: it reverses `num_steps`; implicit and phantom: from the fixed point):
    the budgeted loop runs the same steps on the same values, and the ceiling only
    changes what runs around them (the exact state's buffer is sized for `max_steps`
    steps but holds the same bits). Autodiff through the loop (unrolled: a masked scan
    of `max_steps` steps instead of `b`; checkpointed: a schedule sized by `max_steps`)
    is another compiled program, in which XLA may fuse and associate the same arithmetic
    differently: measured up to ~2 float32 ulps (value: 1 ulp; gradient: relative 3e-6
    on an element 100x smaller than the largest), hence a tolerance of 1e-6 of each
    leaf's largest element there.
    """
    adjoint = ALL_ADJOINTS[adjoint_name]
    through_loop = adjoint_name in ("unrolled", "checkpoint")
    block = _TanhBlock(tree=tree, key=getkey())
    x = 0.5 * jr.normal(getkey(), (DIM,))
    z0 = _z0(tree)
    run = ft.partial(_solve_and_grad, solver=solver, adjoint=adjoint)
    traces = []

    @eqx.filter_jit
    def budgeted(*args, step_budget):
        traces.append(None)
        return run(*args, max_steps=CEILING, step_budget=step_budget)

    for b in BUDGETS:
        got = budgeted(block, x, z0, step_budget=jnp.asarray(b, jnp.int32))
        want = eqx.filter_jit(ft.partial(run, max_steps=b, step_budget=None))(block, x, z0)
        assert int(got[0][1]) <= b
        if b == BUDGETS[0]:  # the small budget stops the solve, not the tolerance
            assert int(got[0][1]) == b, solver_name
        (got_stats, got_grads), (want_stats, want_grads) = got, want
        # num_steps, nfe and the result code: always exactly equal.
        for i in (1, 3, 4):  # num_steps, nfe, result
            g, w = got_stats[i], want_stats[i]
            np.testing.assert_array_equal(g, w)
        if through_loop:
            jtu.tree_map(_assert_close_to_largest, got_stats[0], want_stats[0])
            # ||f(z) - z|| / ||f(z)|| differences nearly equal iterates: a 1-ulp change of
            # z is a relative change of about ulp / residual (measured 1.3e-5 at 3e-3).
            np.testing.assert_allclose(got_stats[2], want_stats[2], rtol=1e-4)
            jtu.tree_map(_assert_close_to_largest, got_grads, want_grads)
        else:
            jtu.tree_map(np.testing.assert_array_equal, got_stats, want_stats)
            jtu.tree_map(np.testing.assert_array_equal, got_grads, want_grads)
    assert len(traces) == 1  # one compiled program served both budgets


def _assert_close_to_largest(got, want):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)


def test_changing_budget_does_not_recompile(getkey):
    """A Python counter in the jitted body counts traces: one for ten budgets."""
    block = _TanhBlock(tree=False, key=getkey())
    deq = rdeq.DEQ(block, max_steps=CEILING, rtol=0.0)  # rtol=0: exactly `budget` steps
    traces = []

    @eqx.filter_jit
    def _value_and_grad(deq, x, budget):
        traces.append(None)

        def _loss(deq, x):
            z, sol = deq(x, step_budget=budget, return_solution=True)
            return jnp.sum(z), sol.num_steps

        return eqx.filter_grad(_loss, has_aux=True)(deq, x)

    x = jr.normal(getkey(), (DIM,))
    for b in range(CEILING + 1):
        _, num_steps = _value_and_grad(deq, x, jnp.asarray(b, jnp.int32))
        assert int(num_steps) == b
    assert len(traces) == 1
    # An array above the ceiling is clamped, below zero too.
    assert int(_value_and_grad(deq, x, jnp.asarray(CEILING + 5, jnp.int32))[1]) == CEILING
    assert int(_value_and_grad(deq, x, jnp.asarray(-3, jnp.int32))[1]) == 0
    assert len(traces) == 1


def test_zero_budget_returns_z0():
    fn = lambda z, x: 0.5 * jnp.tanh(z + x)
    z0 = jnp.full(3, 0.25)
    sol = rdeq.fixed_point(fn, z0, jnp.ones(3), max_steps=4, step_budget=jnp.asarray(0))
    np.testing.assert_array_equal(sol.value, z0)
    assert int(sol.num_steps) == 0 and int(sol.nfe) == 1  # f(z0), for the residual
    assert sol.result == rdeq.RESULTS.max_steps_reached


def test_budget_per_example_under_vmap(getkey):
    """Batched budgets: each example runs its own number of steps, and the reversible
    backward pass reverses exactly those (the gradient of each example is that of its own
    solve)."""
    block = _TanhBlock(tree=False, key=getkey())
    xs = jr.normal(getkey(), (2, DIM))
    budgets = jnp.asarray([1, 5], jnp.int16)  # any integer dtype
    solver = rdeq.Reversible(0.5, state_dtype=None)  # quicker to compile than exact

    def _grad(x, budget, max_steps):
        def _loss(x):
            z0 = jnp.zeros(DIM)
            sol = rdeq.fixed_point(
                block, z0, x, solver=solver, max_steps=max_steps, rtol=0.0, step_budget=budget
            )
            return jnp.sum(sol.value), sol.num_steps

        return jax.grad(_loss, has_aux=True)(x)

    grads, steps = jax.jit(jax.vmap(ft.partial(_grad, max_steps=8)))(xs, budgets)
    np.testing.assert_array_equal(steps, budgets)
    for x, b, g in zip(xs, budgets, grads):
        want, _ = jax.jit(ft.partial(_grad, budget=None, max_steps=int(b)))(x)
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)  # batched arithmetic


def test_deq_budget_matches_max_steps(getkey):
    block = _TanhBlock(tree=False, key=getkey())
    x = jr.normal(getkey(), (DIM,))
    solver = rdeq.Reversible(0.5, state_dtype=None)  # quicker to compile than exact
    deq = rdeq.DEQ(block, solver, max_steps=CEILING, rtol=0.0)
    z = eqx.filter_jit(lambda d, x, b: d(x, step_budget=b))(deq, x, jnp.asarray(3))
    want = eqx.filter_jit(lambda d, x: d(x))(dataclasses.replace(deq, max_steps=3), x)
    np.testing.assert_array_equal(z, want)


def _fn(z, x):
    del x
    return 0.5 * jnp.tanh(z)


# --------------------------------------------------------------------------------------
# Misuse. The messages are tested on the check itself: under the test suite's jaxtyping
# import hook, `fixed_point`'s annotation rejects some of these before the library's
# own check does (with a `TypeError` too).


@pytest.mark.parametrize("budget", [2.0, jnp.asarray(2.0), np.float32(2)])
def test_float_budget(budget):
    with pytest.raises(TypeError, match="`step_budget` must .*integer"):
        check_step_budget(budget, 4)
    with pytest.raises(TypeError):
        rdeq.fixed_point(_fn, jnp.zeros(2), max_steps=4, step_budget=budget)


@pytest.mark.parametrize("budget", [True, jnp.asarray(True)])
def test_bool_budget(budget):
    with pytest.raises(TypeError, match="must be an integer, got a bool"):
        check_step_budget(budget, 4)


def test_non_scalar_budget():
    with pytest.raises(ValueError, match=r"must be a scalar, got shape \(2,\).*jax.vmap"):
        check_step_budget(jnp.asarray([1, 2]), 4)
    with pytest.raises((TypeError, ValueError)):
        rdeq.fixed_point(_fn, jnp.zeros(2), max_steps=4, step_budget=jnp.asarray([1, 2]))


@pytest.mark.parametrize("budget", [5, -1])
def test_static_budget_out_of_range(budget):
    with pytest.raises(ValueError, match=r"must lie in \[0, max_steps=4\].*Raise `max_steps`"):
        rdeq.fixed_point(_fn, jnp.zeros(2), max_steps=4, step_budget=budget)


def test_budget_not_a_number():
    with pytest.raises(TypeError, match="must be an int or an integer scalar array, got str"):
        check_step_budget("4", 4)


def test_wide_integer_budgets_clamp_without_wrapping(x64):
    """An int64/uint32 budget above 2**31 must clamp to the ceiling, not wrap negative."""
    for budget in (jnp.asarray(2**40, jnp.int64), jnp.asarray(2**32 - 1, jnp.uint32)):
        assert int(check_step_budget(budget, 6)) == 6
    assert int(check_step_budget(jnp.asarray(200, jnp.uint8), 300)) == 200
