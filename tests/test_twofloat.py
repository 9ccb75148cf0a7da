"""Two-float state (`state_dtype="float32x2"`): ~48-bit reversal without 64-bit types."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq_jax as rdeq
from revdeq_jax import _twofloat as tf

from .helpers import cast_floats, make_block, tree_rel_error


def _exact(t):
    return np.asarray(t[0], np.float64) + np.asarray(t[1], np.float64)


@pytest.mark.parametrize("jit", [False, True])
def test_error_free_transformations(jit, getkey):
    a = jax.random.normal(getkey(), (1000,)) * 10.0 ** jax.random.uniform(
        getkey(), (1000,), minval=-3, maxval=3
    )
    b = jax.random.normal(getkey(), (1000,))
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    two_sum = jax.jit(tf.two_sum) if jit else tf.two_sum
    two_prod = jax.jit(tf.two_prod) if jit else tf.two_prod
    np.testing.assert_array_equal(_exact(two_sum(a, b)), a64 + b64)  # exact
    rel = np.abs(_exact(two_prod(a, b)) - a64 * b64) / np.abs(a64 * b64)
    assert np.max(rel) <= 2.0**-46  # ~48 bits (the 48-bit product, up to one rounding)
    assert np.median(rel) == 0.0  # and usually exact
    rel32 = np.abs(np.asarray(a * b, np.float64) - a64 * b64) / np.abs(a64 * b64)
    assert np.max(rel32) > 2.0**-26  # plain float32 keeps 24 bits


def test_forward_then_inverse_step_under_jit(getkey):
    """The solver's two-float step and its inverse, compiled (where XLA fuses products
    into FMAs), come back to within ~2^-46 relative."""
    state = rdeq.TwoFloatState()
    z = tf.TwoFloat(
        *tf.two_sum(jax.random.normal(getkey(), (64,)), 1e-8 * jax.random.normal(getkey(), (64,)))
    )
    f = jax.random.normal(getkey(), (64,))

    @jax.jit
    def roundtrip(z, f):
        return state.invert(state.update(z, f, 0.8), f, 0.8)

    back = roundtrip(z, f)
    err = np.max(np.abs(_exact((back.hi, back.lo)) - _exact((z.hi, z.lo))))
    assert err < 2.0**-44, err
    # A float32 state loses ~2^-24 on the same round trip.
    plain = rdeq.FloatState()
    back32 = jax.jit(lambda z, f: plain.invert(plain.update(z, f, 0.8), f, 0.8))(z.hi, f)
    assert np.max(np.abs(np.asarray(back32, np.float64) - np.asarray(z.hi, np.float64))) > 2.0**-30


def test_reconstruction_far_better_than_float32_without_x64(getkey):
    block, x = make_block("mlp", key=getkey(), dtype=jnp.float32)
    errs = {}
    for sd in [None, "float32x2"]:
        solver = rdeq.Reversible(0.8, state_dtype=sd)
        errs[sd] = float(
            rdeq.reconstruction_error(
                block, jnp.zeros_like(x), x, solver=solver, max_steps=32, tol=0.0
            )["abs"]
        )
        jaxpr = str(
            jax.make_jaxpr(
                lambda x: rdeq.fixed_point(block, jnp.zeros_like(x), x, solver=solver).value
            )(x)
        )
        assert "f64" not in jaxpr  # no 64-bit type anywhere in the program
    assert not jax.config.read("jax_enable_x64")
    assert jnp.zeros(1).dtype == jnp.float32
    assert errs["float32x2"] < 1e-4 * errs[None], errs


@pytest.mark.parametrize(
    "name,beta,steps", [("mlp", 0.8, 16), ("attention", 0.8, 8), ("conv", 0.5, 8)]
)
def test_gradient_matches_float64_unrolled(name, beta, steps, getkey):
    key = getkey()
    with jax.enable_x64(True):
        block64, x64_ = make_block(name, key=key, dtype=jnp.float64)
        params64, static = eqx.partition(block64, eqx.is_inexact_array)

        def loss(params, x, solver, adjoint):
            sol = rdeq.fixed_point(
                eqx.combine(params, static),
                jnp.zeros_like(x),
                x,
                solver=solver,
                adjoint=adjoint,
                max_steps=steps,
                tol=0.0,
            )
            return jnp.sum(jnp.sin(sol.value))

        g_ref = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 3))(
            params64, x64_, rdeq.Reversible(beta), rdeq.UnrolledAdjoint()
        )
    params = cast_floats(params64, jnp.float32)
    solver = rdeq.Reversible(beta, state_dtype="float32x2")
    g = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 3))(
        params, x64_.astype(jnp.float32), solver, rdeq.ReversibleAdjoint()
    )
    assert tree_rel_error(g, g_ref) <= 1e-5
