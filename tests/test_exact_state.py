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
from revdeq_jax._state import ExactState, rational_beta

from .helpers import cast_floats, make_block, ReportRecorder, tree_rel_error


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


@pytest.mark.parametrize("name", ["attention", "conv"])
@pytest.mark.parametrize(
    "beta,steps",
    [(0.5, 64), (0.8, 64), pytest.param(0.9, 16, marks=pytest.mark.slow), (0.9, 64)],
)
def test_exact_at_depth(name, beta, steps, getkey):
    block, x = make_block(name, key=getkey(), dtype=jnp.float32)
    z0 = 0.1 * jnp.sin(x)  # a z0 that depends on x: its gradient is checked too
    ref = _reference(block, x, z0, beta, steps)
    recorder = ReportRecorder()
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
    """The paper's float64 state on the same case: far off (the test's cases are hard), and
    the backward pass's own check says so instead of returning the gradient silently."""
    block, x = make_block("attention", key=getkey(), dtype=jnp.float32)
    z0 = jnp.zeros_like(x)
    ref = _reference(block, x, z0, 0.9, 32)
    solver = rdeq.Reversible(0.9, state_dtype=jnp.float64)
    with pytest.raises(Exception, match="did not rebuild the initial state"):
        _grads(block, x, z0, solver, rdeq.ReversibleAdjoint(), 32)
    g = _grads(block, x, z0, solver, rdeq.ReversibleAdjoint(on_mismatch="ignore"), 32)
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
    d = floor(32 / log2(b * 2**m)) digits per uint32 word (beta = 0.9: b = 10; m = 6 guard
    bits: d = 3), plus one int32 lattice exponent per leaf per step."""
    block, x = make_block(name, key=getkey(), dtype=jnp.float32)
    solver = rdeq.Reversible(0.9, state_dtype="exact")
    m4, elements = _temp_bytes(solver, 4, block, x)
    m64, _ = _temp_bytes(solver, 64, block, x)
    d = ExactState().digits_per_word(0.9)
    assert d == 3 and ExactState().buffer_bits_per_step(0.9) == 64 / 3
    buffer_growth = 2 * 4 * (math.ceil(64 / d) - math.ceil(4 / d)) * elements  # bytes
    exponents = 2 * 4 * 60 * 8  # y and z, int32, 60 more steps, 8 examples
    # Measured growth / (buffer + exponents): exactly 1.00x for both blocks (conv:
    # 367760 -> 740240 B). Before the forward loop's `vmap` rule stopped masking the
    # buffer (`in_place_while_loop`), XLA copied it every forward step: 1.40x
    # (attention) and 1.69x (conv, 995984 B). The 5% is slack for XLA's scheduling.
    assert buffer_growth <= m64 - m4 <= 1.05 * (buffer_growth + exponents), (m4, m64)
    # Storing the 64 float32 iterates (y and z), as unrolled autodiff must, costs more.
    assert m64 - m4 < 2 * 4 * 60 * elements


def _prepared(beta, steps, z0):
    return ExactState().resolve(z0, beta, steps)


@pytest.mark.parametrize("beta", [0.5, 0.8, 0.9, 0.875, 1.2, 1 / 3])
def test_push_pop_bit_exact(beta):
    """Integer arithmetic alone: 100 pushes then 100 pops give back the state bit for bit,
    and the state after pushes matches the real-valued recurrence to the lattice."""
    a, b = rational_beta(beta)
    rng = np.random.default_rng(0)
    fs = rng.normal(size=(100, 5)).astype(np.float32) * 3
    z0 = jnp.asarray(rng.normal(size=5), jnp.float32)
    state = _prepared(beta, 100, z0)
    radix = b * 2 ** state.bits_in_use()[1]
    d = state.digits_per_word(beta)
    assert radix**d <= 2**32 < radix ** (d + 1)
    # The refined guard bits fit the words the nominal 6 would take.
    assert ExactState(refine=False).digits_per_word(beta) == d
    with state.scope():
        e0 = state.encode(z0)
        e = e0
        x = np.asarray(state.decode(e0, jnp.float32), np.float64)
        for f in fs:
            e = state.update(e, jnp.asarray(f), beta)
            x = (1 - a / b) * x + (a / b) * f.astype(np.float64)
        # f is rounded to half a float32 ulp of its largest element (|f| < 16): <= 2**-20.
        np.testing.assert_allclose(np.asarray(state.decode(e, jnp.float32)), x, atol=1e-5)
        pushed = np.asarray(e.words)
        assert np.any(pushed != 0)
        for f in fs[::-1]:
            e = state.invert(e, jnp.asarray(f), beta)
        np.testing.assert_array_equal(np.asarray(e.value), np.asarray(e0.value))
        # The backward pass reads the buffer and never writes it.
        np.testing.assert_array_equal(np.asarray(e.words), pushed)
        assert int(e.count) == 0
        assert not bool(state.mismatch(e, z0, None))


@pytest.mark.parametrize("beta", [0.5, 0.8, 0.9, 0.75])
def test_refined_lattice_rounds_less_in_the_same_buffer(beta):
    """`refine` spends the bits the packing leaves unused on a finer lattice: the same
    buffer, the same (or a larger) tolerance, and `fn`'s output rounded 2**e times less
    (e = 1, 2, 1, 0 at beta 0.5, 0.8, 0.9, 0.75). Measured on one step from z0 = 0, whose
    state is exactly beta * (lattice-rounded f) up to the 2**-32 grid."""
    rng = np.random.default_rng(1)
    f = (rng.normal(size=4096) * 10.0 ** rng.uniform(-4, 0, size=4096)).astype(np.float32)
    z0 = jnp.zeros(4096, jnp.float32)
    ulp = _ulp_of_top(f)
    expected_e = {0.5: 1, 0.8: 2, 0.9: 1, 0.75: 0}[beta]
    errors = {}
    for refine in (True, False):
        state = ExactState(refine=refine).resolve(z0, beta, 4)
        with state.scope():
            e = state.update(state.encode(z0), jnp.asarray(f), beta)
            value = np.asarray(e.value, np.float64) * 2.0**-32
        lattice_f = value / beta
        err = np.max(np.abs(lattice_f - f.astype(np.float64))) / ulp
        grid = 2.0**-32 / beta / ulp  # the state's own rounding, in ulps
        assert err <= state.rounding_ulps() + grid, (refine, err)
        errors[refine] = err
        assert state.tolerance_ulps() >= 31.5
    assert ExactState().rounding_ulps(beta) == 0.5 * 2.0**-expected_e
    assert ExactState().buffer_bits_per_step(beta) == ExactState(refine=False).buffer_bits_per_step(
        beta
    )
    if expected_e:
        # 4096 elements over four decades: the worst rounding nears the bound, so it falls.
        assert errors[True] < 0.6 * errors[False], errors


def _ulp_of_top(f: np.ndarray) -> float:
    """A float32 ulp at the binade of the largest magnitude of `f`."""
    top = np.max(np.abs(f))
    return float(np.spacing(np.float32(2.0 ** np.floor(np.log2(top)))))


@pytest.mark.parametrize("beta", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_pop_snaps_perturbed_reevaluations(beta, seed):
    """The stated guarantee, element by element: a re-evaluation within the tolerance (31.5
    ulps of the top binade by default) of the forward's value is snapped back onto it, and
    reversal stays bit-exact; one just past twice the tolerance is not, and the mismatch
    check sees it."""
    rng = np.random.default_rng(seed)
    steps = 40
    scales = 10.0 ** rng.uniform(-3, 2, size=(steps, 1))  # every binade from 1e-3 to 1e2
    fs = (rng.normal(size=(steps, 64)) * scales).astype(np.float32)
    z0 = jnp.asarray(rng.normal(size=64), jnp.float32)
    state = _prepared(beta, steps, z0)
    tol = state.tolerance_ulps()
    k, m = state.bits_in_use()
    # 6 guard bits on a 1-ulp lattice, refined by the packing's spare bits (1, 2, 1 more
    # at beta 0.5, 0.8, 0.9): at least the nominal 31.5 ulps.
    assert m + k == 6 and m > 6 and 31.5 < tol < 32
    with state.scope():
        e0 = state.encode(z0)
        e = e0
        for f in fs:
            e = state.update(e, jnp.asarray(f), beta)
        top = e
        for f in fs[::-1]:
            ulp = _ulp_of_top(f)
            shift = rng.integers(-int(tol), int(tol) + 1, size=f.shape)  # |shift| <= 31 < 31.5
            # keep only the shifts whose float32 result is within tolerance (rounding at the
            # top binade can add half an ulp)
            g = (f.astype(np.float64) + shift * ulp).astype(np.float32)
            ok = np.abs(g.astype(np.float64) - f) < tol * ulp
            g = np.where(ok, g, f)
            assert np.mean(ok) > 0.9 and np.any(g != f)
            e = state.invert(e, jnp.asarray(g), beta)
        np.testing.assert_array_equal(np.asarray(e.value), np.asarray(e0.value))
        assert not bool(state.mismatch(e, z0, None))
        assert 0 < float(e.drift) < tol  # in ulps of the top binade
        # Past the tolerance (a full cycle of the guard bits away): not absorbed.
        e = top
        for i, f in enumerate(fs[::-1]):
            g = f
            if i == steps // 2:
                j = int(np.argmax(np.abs(f)))
                g = f.copy()
                g[j] = np.float32(f[j] + 2 * 2 ** (m + k) * _ulp_of_top(f))
            e = state.invert(e, jnp.asarray(g), beta)
        assert bool(state.mismatch(e, z0, None))


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
    assert auto == rdeq.Reversible(0.8)  # the default

    def chosen(solver, z0, differentiable=False):
        return solver.prepare(z0, 4, differentiable=differentiable).state_dtype

    assert isinstance(chosen(auto, jnp.zeros(3, jnp.float32)), rdeq.ExactState)
    assert isinstance(chosen(auto, jnp.zeros(3, jnp.bfloat16)), rdeq.ExactState)
    # An adjoint that differentiates the solver's arithmetic gets a floating state.
    assert chosen(auto, jnp.zeros(3, jnp.float32), True) == rdeq.FloatState()
    with jax.enable_x64(True):
        # A float64 model keeps float64: the 2**-32 grid would be coarser than its state.
        assert chosen(auto, jnp.zeros(3, jnp.float64)) == rdeq.FloatState()
    irrational = rdeq.Reversible(0.7071067811865476, state_dtype="auto")
    assert chosen(irrational, jnp.zeros(3)) == rdeq.FloatState()


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
