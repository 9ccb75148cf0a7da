"""Convergence of the solvers; Theorem 3.1 for the reversible solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq_jax as rdeq


def _contraction(k, key, dim=12):
    """f(z) = k * A tanh(z) + x with ||A||_2 = 1: Lipschitz constant at most k."""
    k1, k2 = jax.random.split(key)
    a = jax.random.normal(k1, (dim, dim))
    a = a / jnp.linalg.norm(a, 2)
    x = jax.random.normal(k2, (dim,))
    return (lambda z, x: k * a @ jnp.tanh(z) + x), x


@pytest.mark.parametrize("k", [0.5, 0.9])
def test_reversible_converges_for_beta_below_bound(k, getkey):
    fn, x = _contraction(k, getkey())
    ref = rdeq.fixed_point(
        fn,
        jnp.zeros_like(x),
        x,
        solver=rdeq.Picard(),
        adjoint=rdeq.UnrolledAdjoint(),
        max_steps=400,
        tol=1e-6,
    )
    assert ref.converged
    bound = 2 / (k + 1)
    for beta in [0.3, 0.5, 0.8, 0.95 * bound]:
        sol = rdeq.fixed_point(
            fn, jnp.zeros_like(x), x, solver=rdeq.Reversible(beta), max_steps=400, tol=1e-6
        )
        assert sol.converged, beta
        np.testing.assert_allclose(sol.value, ref.value, rtol=1e-4, atol=1e-4)


def test_reversible_y_and_z_both_converge(getkey):
    """Theorem 3.1 says both coupled states converge: check y too, by solving with tol=0."""
    fn, x = _contraction(0.8, getkey())
    z0 = jnp.zeros_like(x)
    solver = rdeq.Reversible(0.7, state_dtype=None).prepare(z0, 200)
    from revdeq_jax._iterate import iterate, lax_while_loop

    out = iterate((fn, x, z0), lax_while_loop, solver=solver, max_steps=200, rtol=0.0, atol=0.0)
    y, z = solver.coupled(out.state)
    np.testing.assert_allclose(y, z, atol=1e-5)
    np.testing.assert_allclose(fn(z, x), z, atol=1e-5)


def test_relaxed_threshold_on_linear_map():
    """f(z) = -k z + x: relaxed iteration contracts iff beta < 2/(1+k).

    Theorem 3.1's bound is only sufficient for the reversible iteration: on this map its
    step matrix has determinant (1-beta)^2 and complex eigenvalues past the bound, so it
    still converges there (checked below), unlike relaxed iteration."""
    k = 0.6
    x = jnp.ones(3)
    fn = lambda z, x: -k * z + x
    bound = 2 / (1 + k)
    solve = lambda solver: rdeq.fixed_point(
        fn, jnp.zeros(3), x, solver=solver, adjoint=rdeq.UnrolledAdjoint(), max_steps=300, tol=1e-5
    )
    for solver_cls in [rdeq.Relaxed, rdeq.Reversible]:
        ok = solve(solver_cls(beta=0.9 * bound))
        assert ok.converged
        np.testing.assert_allclose(ok.value, x / (1 + k), rtol=1e-4)
    assert not solve(rdeq.Relaxed(beta=1.1 * bound)).converged
    assert solve(rdeq.Reversible(beta=1.1 * bound)).converged


@pytest.mark.parametrize(
    "solver",
    [rdeq.Picard(), rdeq.Relaxed(0.7), rdeq.Anderson(m=5), rdeq.Broyden(m=8), rdeq.Reversible(0.5)],
    ids=lambda s: type(s).__name__,
)
def test_all_solvers_agree(solver, getkey):
    fn, x = _contraction(0.9, getkey())
    ref = rdeq.fixed_point(
        fn,
        jnp.zeros_like(x),
        x,
        solver=rdeq.Picard(),
        adjoint=rdeq.UnrolledAdjoint(),
        max_steps=400,
        tol=1e-7,
    )
    adjoint = (
        rdeq.ReversibleAdjoint() if isinstance(solver, rdeq.Reversible) else rdeq.ImplicitAdjoint()
    )
    sol = rdeq.fixed_point(
        fn, jnp.zeros_like(x), x, solver=solver, adjoint=adjoint, max_steps=400, tol=1e-6
    )
    assert sol.converged
    assert sol.nfe == 1 + solver.nfe_per_step * sol.num_steps
    np.testing.assert_allclose(sol.value, ref.value, rtol=1e-4, atol=1e-4)


def test_accelerated_solvers_need_fewer_steps(getkey):
    """A slowly contracting linear map (spectrum up to 0.98): Picard needs ~700 steps."""
    k1, k2 = jax.random.split(getkey())
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (12, 12)))
    a = q @ jnp.diag(jnp.linspace(0.5, 0.98, 12)) @ q.T
    x = jax.random.normal(k2, (12,))
    fn = lambda z, x: a @ z + x
    steps = {}
    for solver in [rdeq.Picard(), rdeq.Anderson(m=6), rdeq.Broyden(m=24)]:
        sol = rdeq.fixed_point(
            fn,
            jnp.zeros_like(x),
            x,
            solver=solver,
            adjoint=rdeq.ImplicitAdjoint(),
            max_steps=2000,
            tol=1e-4,
        )
        assert sol.converged
        steps[type(solver).__name__] = int(sol.num_steps)
        exact = jnp.linalg.solve(jnp.eye(12) - a, x)
        # error <= cond(I - A) * residual = 50 * 1e-4
        assert jnp.linalg.norm(sol.value - exact) <= 5e-3 * jnp.linalg.norm(exact)
    assert steps["Anderson"] < steps["Picard"] / 5, steps
    assert steps["Broyden"] < steps["Picard"] / 5, steps
