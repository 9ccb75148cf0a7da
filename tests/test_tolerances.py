"""`rtol`, `atol` (and `tol`, the other name of `rtol`): the one stopping test

    ||f(z) - z||_rms <= atol + rtol * ||f(z)||_rms,

used by every solver, by `DEQ` and by `ImplicitAdjoint`'s backward solve.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq_jax as rdeq


_SOLVERS = [
    rdeq.Picard(),
    rdeq.Relaxed(0.8),
    rdeq.Anderson(),
    rdeq.Broyden(),
    rdeq.Reversible(0.5, jnp.float64),
]
_ids = [type(s).__name__ for s in _SOLVERS]

_A = np.array([[0.3, 0.2], [-0.1, 0.4]])  # spectral norm 0.5: a contraction, fixed point 0


def _linear(z, a):
    return jnp.asarray(_A) @ z


def _rms(v):
    return float(np.sqrt(np.mean(np.square(v))))


@pytest.mark.parametrize("solver", _SOLVERS, ids=_ids)
def test_atol_stops_at_a_zero_fixed_point(solver, x64):
    """The relative residual of a linear map does not fall as z -> 0; before `atol`
    existed these solves stopped only by underflow (hundreds of steps) or never."""
    z0 = jnp.array([1.0, -2.0])
    sol = rdeq.fixed_point(_linear, z0, None, solver=solver, max_steps=100, rtol=0.0, atol=1e-10)
    assert sol.result == rdeq.RESULTS.successful
    z = np.asarray(sol.value)
    # The reported residual is the RMS of f(z) - z, recomputed here, and passes the test.
    # (reported in float32: below its normal range only the absolute error counts)
    np.testing.assert_allclose(sol.abs_residual, _rms(_A @ z - z), rtol=1e-6, atol=1e-37)
    assert _rms(_A @ z - z) <= 1e-10
    # Contraction with k = 0.5: ||z - 0|| <= ||f(z) - z|| / (1 - k).
    assert _rms(z) <= 2e-10
    # Linear convergence from ||z0|| ~ 1.6 to 1e-10: Picard (rate 0.5) needs ~34 steps,
    # the slowest here, Reversible(0.5), 53. The relative test alone needed hundreds.
    assert int(sol.num_steps) <= 60


def test_picard_steps_match_an_independent_loop(x64):
    """Picard on f(z) = a z stops at the first n with |a^(n+1) - a^n| z0 <= atol + rtol
    |a^(n+1) z0|, counted here in plain Python."""
    a, z0, rtol, atol = 0.5, 3.0, 1e-3, 1e-9

    def expected():
        z = z0
        for n in range(1000):
            if abs(a * z - z) <= atol + rtol * abs(a * z):
                return n
            z = a * z

    sol = rdeq.fixed_point(
        lambda z, _: a * z,
        jnp.array(z0),
        solver=rdeq.Picard(),
        max_steps=1000,
        rtol=rtol,
        atol=atol,
    )
    assert int(sol.num_steps) == expected() == 31
    # With only the relative test this problem runs until underflow.
    rel_only = rdeq.fixed_point(
        lambda z, _: a * z, jnp.array(z0), solver=rdeq.Picard(), max_steps=2000, rtol=rtol
    )
    assert int(rel_only.num_steps) > 1000


def test_tol_is_rtol():
    fn = lambda z, x: jnp.cos(z) + 0 * x
    kw = dict(solver=rdeq.Picard(), max_steps=200)
    a = rdeq.fixed_point(fn, jnp.zeros(3), jnp.ones(3), tol=1e-5, **kw)
    b = rdeq.fixed_point(fn, jnp.zeros(3), jnp.ones(3), rtol=1e-5, **kw)
    assert int(a.num_steps) == int(b.num_steps)
    np.testing.assert_array_equal(a.value, b.value)
    assert float(a.residual) <= 1e-5
    assert rdeq.DEQ(fn, tol=1e-4).rtol == rdeq.DEQ(fn, rtol=1e-4).tol == 1e-4
    assert rdeq.ImplicitAdjoint(tol=1e-4).rtol == rdeq.ImplicitAdjoint(rtol=1e-4).tol == 1e-4


def test_zero_tolerances_run_every_step():
    sol = rdeq.fixed_point(
        lambda z, _: 0.5 * z, jnp.zeros(2), solver=rdeq.Picard(), max_steps=7, rtol=0.0
    )
    assert int(sol.num_steps) == 7
    assert sol.result == rdeq.RESULTS.successful
    # One tolerance > 0 is a stopping test: at the exact fixed point 0 it passes at once.
    sol = rdeq.fixed_point(
        lambda z, _: 0.5 * z, jnp.zeros(2), solver=rdeq.Picard(), max_steps=7, rtol=1e-3
    )
    assert int(sol.num_steps) == 0


def test_deq_passes_atol(x64):
    deq = rdeq.DEQ(
        lambda z, x: _linear(z, x) + 0 * x,
        solver=rdeq.Picard(),
        max_steps=100,
        rtol=0.0,
        atol=1e-10,
    )
    _, sol = deq(jnp.ones(2), jnp.array([1.0, -2.0]), return_solution=True)
    ref = rdeq.fixed_point(
        _linear, jnp.array([1.0, -2.0]), solver=rdeq.Picard(), max_steps=100, rtol=0.0, atol=1e-10
    )
    assert int(sol.num_steps) == int(ref.num_steps) < 100


def test_implicit_adjoint_atol(x64, getkey):
    """`ImplicitAdjoint(atol=...)` reaches its backward solve: a huge `atol` stops it at
    w = z_bar (the Jacobian-free gradient, as `PhantomAdjoint()`), a tiny one gives the
    implicit-function-theorem gradient, computed here with `jnp.linalg.solve`."""
    w = 0.4 * jax.random.normal(getkey(), (3, 3)) / np.sqrt(3)
    x = jax.random.normal(getkey(), (3,))
    fn = lambda z, a: jnp.tanh(a[0] @ z + a[1])
    z0 = jnp.zeros(3)

    def grad(adjoint):
        def loss(args):
            sol = rdeq.fixed_point(
                fn,
                z0,
                args,
                solver=rdeq.Picard(),
                adjoint=adjoint,
                max_steps=200,
                rtol=1e-13,
            )
            return jnp.sum(sol.value**2)

        return jax.grad(loss)((w, x))

    loose = grad(rdeq.ImplicitAdjoint(rtol=0.0, atol=1e3))
    jfb = grad(rdeq.PhantomAdjoint())
    for g, r in zip(jax.tree.leaves(loose), jax.tree.leaves(jfb)):
        np.testing.assert_allclose(g, r, rtol=1e-12)

    tight = grad(rdeq.ImplicitAdjoint(rtol=0.0, atol=1e-14, max_steps=200))
    z = rdeq.fixed_point(fn, z0, (w, x), solver=rdeq.Picard(), max_steps=200, rtol=1e-13).value
    jac = jax.jacfwd(fn)(z, (w, x))
    v = jnp.linalg.solve((jnp.eye(3) - jac).T, 2 * z)
    ref = jax.vjp(lambda a: fn(z, a), (w, x))[1](v)[0]
    for g, r in zip(jax.tree.leaves(tight), jax.tree.leaves(ref)):
        # Forward and backward solved to ~1e-13 relative; conditioning of I - J ~ 2.
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


# --- misuse fails at trace time, saying what to change ---------------------------------

fn = lambda z, x: jnp.tanh(z + x)


@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["rtol", "atol", "tol"])
def test_bad_tolerance(name, value):
    match = f"`{name}={value}` must be >= 0 and finite"
    with pytest.raises(ValueError, match=match):
        rdeq.fixed_point(fn, jnp.zeros(2), jnp.ones(2), **{name: value})
    with pytest.raises(ValueError, match=match):
        rdeq.DEQ(fn, **{name: value})
    with pytest.raises(ValueError, match=match):
        rdeq.ImplicitAdjoint(**{name: value})


def test_tol_and_rtol_together():
    with pytest.raises(TypeError, match="`tol` is another name for the relative tolerance"):
        rdeq.fixed_point(fn, jnp.zeros(2), jnp.ones(2), tol=1e-3, rtol=1e-3)
    with pytest.raises(TypeError, match="Pass only one of them"):
        rdeq.DEQ(fn, tol=1e-3, rtol=1e-4)
    with pytest.raises(TypeError, match="Pass only one of them"):
        rdeq.ImplicitAdjoint(tol=1e-3, rtol=1e-4)


def test_traced_tolerance():
    from revdeq_jax._iterate import check_tolerances

    with pytest.raises(TypeError, match=r"`fixed_point\(..., atol=...\)` must be a Python float"):
        check_tolerances(None, jnp.array(1e-3), None, default_rtol=1e-3, owner="fixed_point")
    # Through `fixed_point` the test suite's jaxtyping hook may answer first.
    with pytest.raises(TypeError):
        eqx.filter_jit(lambda a: rdeq.fixed_point(fn, jnp.zeros(2), jnp.ones(2), atol=a))(
            jnp.array(1e-3)
        )


def test_broyden_best_iterate_is_by_absolute_residual(x64):
    """f(z) = z/2 + z^2/10 from z0 = 2: the relative residual |f(z) - z| / |f(z)| *rises*
    from 0.43 to 1 as z -> 0, so a best iterate chosen by it stays at z0 forever and no
    absolute test can pass. Chosen by |f(z) - z| it converges to 0."""
    fn = lambda z, _: 0.5 * z + 0.1 * z**2
    sol = rdeq.fixed_point(
        fn, jnp.array([2.0]), solver=rdeq.Broyden(), max_steps=50, rtol=0.0, atol=1e-12
    )
    assert sol.result == rdeq.RESULTS.successful
    assert abs(float(sol.value[0])) <= 2e-12  # |z - 0| <= |f(z) - z| / (1 - 0.9)
