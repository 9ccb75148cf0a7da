"""The bit-exact reversible state (`state_dtype="exact"`): exact gradients at any depth.

The reference is always the float64 unrolled gradient (plain autodiff through the stored
loop, everything in float64), never the code under test. With `fn` in float32 the floor
is float32 rounding (~1e-7 relative, growing slowly with depth); a float64 state, the
paper's recipe, is off by 1e-2 to nan on the same cases (checked below so that the test
would notice if the cases became easy).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq_jax as rdeq
from revdeq_jax._exact import ExactArithmetic, rational_beta

from .helpers import cast_floats, make_block, tree_rel_error


def _grads(block, x, z0, solver, adjoint, steps, tol=0.0):
    params, static = eqx.partition(block, eqx.is_inexact_array)

    def loss(params, x, z0):
        layer = eqx.combine(params, static)
        sol = rdeq.fixed_point(
            layer, z0, x, solver=solver, adjoint=adjoint, max_steps=steps, tol=tol
        )
        return jnp.sum(jnp.sin(sol.value))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, z0)


def _reference(block, x, z0, beta, steps, tol=0.0):
    """Float64 unrolled gradient, as numpy."""
    with jax.enable_x64(True):
        g = _grads(
            cast_floats(block, jnp.float64),
            x.astype(jnp.float64),
            z0.astype(jnp.float64),
            rdeq.Reversible(beta),
            rdeq.UnrolledAdjoint(),
            steps,
            tol,
        )
        return jax.tree.map(np.asarray, g)


class _Recorder:
    def __init__(self):
        self.reports = []

    def __call__(self, report):
        self.reports.append({k: np.asarray(v) for k, v in report.items()})


@pytest.mark.parametrize("name", ["attention", "conv"])
@pytest.mark.parametrize(
    "beta,steps",
    [(0.5, 64), (0.8, 64), pytest.param(0.9, 16, marks=pytest.mark.slow), (0.9, 64)],
)
def test_exact_at_depth(name, beta, steps, getkey):
    block, x = make_block(name, key=getkey(), dtype=jnp.float32)
    z0 = 0.1 * jnp.sin(x)  # a z0 that depends on x: its gradient is checked too
    ref = _reference(block, x, z0, beta, steps)
    recorder = _Recorder()
    g = _grads(
        block,
        x,
        z0,
        rdeq.Reversible(beta, state_dtype="exact"),
        rdeq.ReversibleAdjoint(report=recorder),
        steps,
    )
    # Reversal rebuilt the initial state to the bit...
    assert recorder.reports and float(recorder.reports[-1]["abs"]) == 0.0
    # ...so the only error left is float32 rounding inside `fn`.
    assert tree_rel_error(g, ref) <= 1e-5
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(g))


def test_float64_state_fails_where_exact_state_holds(getkey):
    """The paper's float64 state on the same case: far off (the test's cases are hard)."""
    block, x = make_block("attention", key=getkey(), dtype=jnp.float32)
    z0 = jnp.zeros_like(x)
    ref = _reference(block, x, z0, 0.9, 32)
    g = _grads(
        block,
        x,
        z0,
        rdeq.Reversible(0.9, state_dtype=jnp.float64),
        rdeq.ReversibleAdjoint(),
        32,
    )
    err = tree_rel_error(g, ref)
    assert not err <= 1e-3, err  # nan counts as failing too


def test_exact_vmap_early_stopping(getkey):
    """Per-example stopping under `vmap`: every example reverses its own number of steps."""
    block, _ = make_block("mlp", key=getkey(), dtype=jnp.float32)
    xs = jax.random.normal(getkey(), (3, 16)) * jnp.array([[0.1], [1.0], [3.0]])
    beta, steps, tol = 0.8, 60, 1e-5
    params, static = eqx.partition(block, eqx.is_inexact_array)

    def loss(params, xs, solver, adjoint):
        def one(x):
            sol = rdeq.fixed_point(
                eqx.combine(params, static),
                jnp.zeros_like(x),
                x,
                solver=solver,
                adjoint=adjoint,
                max_steps=steps,
                tol=tol,
            )
            return jnp.sum(jnp.sin(sol.value)), sol.num_steps

        vals, n = jax.vmap(one)(xs)
        return jnp.sum(vals), n

    with jax.enable_x64(True):
        p64 = cast_floats(params, jnp.float64)
        (_, n_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(
            p64, xs.astype(jnp.float64), rdeq.Reversible(beta), rdeq.UnrolledAdjoint()
        )
        g_ref = jax.tree.map(np.asarray, g_ref)
    (_, n), g = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(2, 3))(
        params, xs, rdeq.Reversible(beta, state_dtype="exact"), rdeq.ReversibleAdjoint()
    )
    assert len(set(np.asarray(n).tolist())) > 1, n  # the examples really stop apart
    np.testing.assert_array_equal(np.asarray(n), np.asarray(n_ref))
    assert tree_rel_error(g, g_ref) <= 1e-5


def _temp_bytes(solver, steps, block, x):
    params, static = eqx.partition(block, eqx.is_inexact_array)

    def loss(params, xs):
        def one(x):
            sol = rdeq.fixed_point(
                eqx.combine(params, static),
                jnp.zeros_like(x),
                x,
                solver=solver,
                max_steps=steps,
                tol=0.0,
            )
            return jnp.sum(sol.value**2)

        return jnp.sum(jax.vmap(one)(xs))

    xs = jnp.broadcast_to(x, (8, *x.shape))
    compiled = jax.jit(jax.grad(loss)).lower(params, xs).compile()
    return compiled.memory_analysis().temp_size_in_bytes, xs.size


@pytest.mark.parametrize("name", ["attention", "conv"])
def test_exact_memory_bound(name, getkey):
    """Memory grows only by the information buffer: 2 * 32 / d bits per element per step,
    d = floor(32 / log2(b)) base-b digits per uint32 word (beta = 0.9: b = 10, d = 9)."""
    block, x = make_block(name, key=getkey(), dtype=jnp.float32)
    solver = rdeq.Reversible(0.9, state_dtype="exact")
    m4, elements = _temp_bytes(solver, 4, block, x)
    m64, _ = _temp_bytes(solver, 64, block, x)
    d = ExactArithmetic(9, 10, 32).digits_per_word
    assert d == 9
    buffer_growth = 2 * 4 * (math.ceil(64 / d) - math.ceil(4 / d)) * elements  # bytes
    # Measured: exactly the buffer on the attention block, +14% on the conv block (XLA
    # keeps one extra copy of part of it).
    assert buffer_growth <= m64 - m4 <= 1.25 * buffer_growth, (m4, m64, buffer_growth)
    # Storing the 64 float32 iterates (y and z), as unrolled autodiff must, costs 8x more.
    assert m64 - m4 < 2 * 4 * 60 * elements / 4


@pytest.mark.parametrize("beta", [0.5, 0.8, 0.9, 0.875, 1.2, 1 / 3])
def test_push_pop_bit_exact(beta):
    """Integer arithmetic alone: 100 pushes then 100 pops give back the state bit for bit,
    and the state after pushes matches the real-valued recurrence to the grid."""
    a, b = rational_beta(beta)
    arith = ExactArithmetic(a, b, 32)
    assert b**arith.digits_per_word <= 2**32 < b ** (arith.digits_per_word + 1)
    rng = np.random.default_rng(0)
    fs = rng.normal(size=(100, 5)).astype(np.float32) * 3
    with jax.enable_x64(True):
        e0 = arith.encode(jnp.asarray(rng.normal(size=5), jnp.float32), 100)
        e = e0
        x = np.asarray(arith.decode(e0, jnp.float64))
        for f in fs:
            e = arith.push(e, jnp.asarray(f))
            x = (1 - a / b) * x + (a / b) * f.astype(np.float64)
        np.testing.assert_allclose(np.asarray(arith.decode(e, jnp.float64)), x, atol=1e-8)
        for f in fs[::-1]:
            e = arith.pop(e, jnp.asarray(f))
        np.testing.assert_array_equal(np.asarray(e.value), np.asarray(e0.value))
        np.testing.assert_array_equal(np.asarray(e.words), 0)
        assert int(e.count) == 0


def test_exact_overflow_is_nonfinite(getkey):
    """A value outside the fixed-point range is reported like an overflowing float."""
    x = jax.random.normal(getkey(), (4,))
    sol = rdeq.fixed_point(
        lambda z, x: 1e12 * (z + x),  # |f| > 2**30: out of range for F = 32 bits
        jnp.zeros(4),
        x,
        solver=rdeq.Reversible(0.5, state_dtype="exact"),
        max_steps=5,
        tol=0.0,
    )
    assert sol.result == rdeq.RESULTS.nonfinite
    assert not np.all(np.isfinite(np.asarray(sol.value)))


def test_exact_state_leaves_x64_alone(getkey):
    before = jax.config.read("jax_enable_x64")
    block, x = make_block("mlp", key=getkey(), dtype=jnp.float32)
    sol = rdeq.fixed_point(
        block,
        jnp.zeros_like(x),
        x,
        solver=rdeq.Reversible(0.8, state_dtype="exact"),
        max_steps=8,
    )
    assert sol.value.dtype == jnp.float32
    assert jax.config.read("jax_enable_x64") == before
    assert jnp.zeros(2).dtype == jnp.float32


def test_exact_state_errors():
    with pytest.raises(ValueError, match="ratio"):
        rdeq.Reversible(0.7071067811865476, state_dtype="exact")
    with pytest.raises(ValueError, match="fraction_bits"):
        rdeq.ExactState(fraction_bits=60)
    z0 = jnp.zeros(3)
    with pytest.raises(ValueError, match="ReversibleAdjoint"):
        rdeq.fixed_point(
            lambda z, _: 0.5 * z,
            z0,
            None,
            solver=rdeq.Reversible(0.5, state_dtype="exact"),
            adjoint=rdeq.UnrolledAdjoint(),
            max_steps=3,
        )
    assert rdeq.Reversible(0.5, state_dtype="exact").state_dtype == rdeq.ExactState()


def test_auto_state_picks_exact_only_where_it_fits():
    auto = rdeq.Reversible(0.8, state_dtype="auto")
    assert auto.specialise(jnp.zeros(3, jnp.float32)).state_dtype == rdeq.ExactState()
    assert auto.specialise(jnp.zeros(3, jnp.bfloat16)).state_dtype == rdeq.ExactState()
    with jax.enable_x64(True):
        # A float64 model keeps float64: the 2**-32 grid would be coarser than its state.
        assert auto.specialise(jnp.zeros(3, jnp.float64)).state_dtype is None
    irrational = rdeq.Reversible(0.7071067811865476, state_dtype="auto")
    assert irrational.specialise(jnp.zeros(3)).state_dtype is None


def test_auto_state_reconstructs_to_the_bit(getkey):
    """Through `fixed_point`: the float32 attention block at beta = 0.9 and 32 steps, where
    a float64 state's reconstruction has blown up, reverses exactly."""
    block, x = make_block("attention", key=getkey(), dtype=jnp.float32)
    auto = rdeq.Reversible(0.9, state_dtype="auto")
    err = rdeq.reconstruction_error(block, jnp.zeros_like(x), x, solver=auto, max_steps=32, tol=0.0)
    assert float(err["abs"]) == 0.0
    err64 = rdeq.reconstruction_error(
        block,
        jnp.zeros_like(x),
        x,
        solver=rdeq.Reversible(0.9, state_dtype=jnp.float64),
        max_steps=32,
        tol=0.0,
    )
    assert not float(err64["abs"]) < 1e-3


@pytest.mark.parametrize("adjoint", [rdeq.ImplicitAdjoint(), rdeq.PhantomAdjoint(steps=3)])
def test_exact_state_with_approximate_adjoints(adjoint, getkey):
    """Adjoints that differentiate `fn` at the solution accept the exact state and give
    the gradient they give with a floating state (the solutions agree to the 2**-32 grid)."""
    block, x = make_block("mlp", key=getkey(), dtype=jnp.float32)

    def grad(state_dtype):
        def loss(x):
            sol = rdeq.fixed_point(
                block,
                jnp.zeros_like(x),
                x,
                solver=rdeq.Reversible(0.5, state_dtype=state_dtype),
                adjoint=adjoint,
                max_steps=40,
                tol=1e-6,
            )
            return jnp.sum(sol.value**2)

        return jax.grad(loss)(x)

    assert tree_rel_error(grad("exact"), grad(jnp.float64)) <= 1e-5
