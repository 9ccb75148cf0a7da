"""Implicit (IFT) and phantom gradients approach the exact implicit gradient."""

import equinox as eqx
import jax
import jax.numpy as jnp

import revdeq_jax as rdeq

from .helpers import MLPBlock, tree_rel_error


def _grad(block, x, solver, adjoint, max_steps, tol):
    def loss(block, x):
        sol = rdeq.fixed_point(
            block,
            jnp.zeros_like(x),
            x,
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            tol=tol,
        )
        return jnp.sum(jnp.sin(sol.value))

    return eqx.filter_grad(loss)(block, x)


def test_implicit_adjoint_converges_to_exact(x64, getkey):
    kb, kx = jax.random.split(getkey())
    block = MLPBlock(16, key=kb, dtype=jnp.float64, scale=0.9)
    x = jax.random.normal(kx, (16,), jnp.float64)
    # Reference: exact gradient of a forward solve converged to ~machine precision;
    # at a true fixed point this equals the implicit-function-theorem gradient.
    exact = _grad(block, x, rdeq.Picard(), rdeq.UnrolledAdjoint(), 300, 1e-14)
    errors = []
    for tol in [1e-1, 1e-3, 1e-6, 1e-10]:
        adjoint = rdeq.ImplicitAdjoint(solver=rdeq.Picard(), tol=tol, max_steps=500)
        g = _grad(block, x, rdeq.Anderson(m=5), adjoint, 300, 1e-13)
        errors.append(tree_rel_error(g, exact))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8, errors
    assert errors[0] > 1e-3, errors


def test_phantom_adjoint_approaches_exact_with_steps(x64, getkey):
    kb, kx = jax.random.split(getkey())
    block = MLPBlock(16, key=kb, dtype=jnp.float64, scale=0.7)
    x = jax.random.normal(kx, (16,), jnp.float64)
    exact = _grad(block, x, rdeq.Picard(), rdeq.UnrolledAdjoint(), 300, 1e-14)
    errors = [
        tree_rel_error(
            _grad(block, x, rdeq.Picard(), rdeq.PhantomAdjoint(steps=k), 300, 1e-13), exact
        )
        for k in [1, 3, 9, 27]
    ]
    # Error shrinks geometrically with the phantom steps until it hits rounding (~1e-13).
    assert all(a > b or b < 1e-11 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10, errors
    assert errors[0] > 1e-2, errors  # one-step (JFB) is a real approximation


def test_implicit_adjoint_z0_gets_no_gradient(x64):
    fn = lambda z, x: 0.5 * jnp.tanh(z) + x

    def loss(z0, adjoint):
        return jnp.sum(
            rdeq.fixed_point(
                fn, z0, jnp.ones(3), solver=rdeq.Picard(), adjoint=adjoint, max_steps=200, tol=1e-12
            ).value
        )

    assert jnp.all(jax.grad(loss)(jnp.ones(3), rdeq.ImplicitAdjoint()) == 0)
    # ...whereas the exact gradient of the computation is not exactly zero.
    assert jnp.any(jax.grad(loss)(jnp.ones(3), rdeq.UnrolledAdjoint()) != 0)


def test_checkpoint_adjoint_matches_unrolled(x64, getkey):
    kb, kx = jax.random.split(getkey())
    block = MLPBlock(16, key=kb, dtype=jnp.float64)
    x = jax.random.normal(kx, (16,), jnp.float64)
    for solver in [rdeq.Anderson(), rdeq.Reversible(0.5)]:
        g_ck = _grad(block, x, solver, rdeq.CheckpointAdjoint(), 12, 1e-6)
        g_un = _grad(block, x, solver, rdeq.UnrolledAdjoint(), 12, 1e-6)
        assert tree_rel_error(g_ck, g_un) <= 1e-12
