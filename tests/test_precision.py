"""Mixed precision is scoped: the solver's state is float64, nothing global changes."""

import jax
import jax.numpy as jnp

import revdeq_jax as rdeq

from .helpers import make_block, tree_rel_error


def test_no_global_x64_and_fn_sees_its_own_dtype(getkey):
    seen = []

    def fn(z, x):
        seen.append((z.dtype, jnp.zeros(3).dtype, jax.config.read("jax_enable_x64")))
        return jnp.tanh(z + x)

    solver = rdeq.Reversible(0.8, state_dtype=jnp.float64)
    x = jnp.ones(3)
    grad = jax.grad(
        lambda x: jnp.sum(rdeq.fixed_point(fn, jnp.zeros(3), x, solver=solver, max_steps=4).value)
    )(x)
    assert grad.dtype == jnp.float32
    assert not jax.config.read("jax_enable_x64")
    assert jnp.zeros(2).dtype == jnp.float32
    assert jnp.asarray(1.0).dtype == jnp.float32
    assert seen and all(s == (jnp.float32, jnp.float32, False) for s in seen)
    sol = rdeq.fixed_point(fn, jnp.zeros(3), x, solver=solver, max_steps=4)
    assert sol.value.dtype == jnp.float32


def test_state_really_is_float64(getkey):
    """The solver's loop carries float64 arrays (checked in the traced program)."""
    solver = rdeq.Reversible(0.8, state_dtype=jnp.float64)
    fn = lambda z, x: jnp.tanh(z + x)
    jaxpr = jax.make_jaxpr(lambda x: rdeq.fixed_point(fn, jnp.zeros(3), x, solver=solver).value)(
        jnp.ones(3)
    )
    assert "f64[3]" in str(jaxpr)
    jaxpr32 = jax.make_jaxpr(lambda x: rdeq.fixed_point(fn, jnp.zeros(3), x).value)(jnp.ones(3))
    assert "f64" not in str(jaxpr32)


def test_float64_state_reconstructs_better_than_float32(getkey):
    block, x = make_block("attention", key=getkey(), dtype=jnp.float32)
    errs = {}
    for name, dtype in [("f32", None), ("f64", jnp.float64)]:
        errs[name] = float(
            rdeq.reconstruction_error(
                block,
                jnp.zeros_like(x),
                x,
                solver=rdeq.Reversible(0.8, state_dtype=dtype),
                max_steps=4,
                tol=0.0,
            )["abs"]
        )
    assert errs["f64"] < 1e-3 * errs["f32"], errs


def test_bfloat16_layer_with_float64_state(getkey):
    """A bf16 `fn` with a float64 state at beta=0.5 reconstructs exactly, and the
    reversible gradient is that of the unrolled computation in the same precision.

    A float32 state is not enough for a bf16 `fn`: adding a 8-bit-mantissa f(z) to a
    24-bit state whose exponent is far smaller rounds (reconstruction error ~4e-2 here)."""
    block, x = make_block("mlp", key=getkey(), dtype=jnp.bfloat16)
    solver = rdeq.Reversible(0.5, state_dtype=jnp.float64)
    err = rdeq.reconstruction_error(
        block, jnp.zeros_like(x), x, solver=solver, max_steps=6, tol=0.0
    )
    assert float(err["abs"]) == 0.0
    err32 = rdeq.reconstruction_error(
        block,
        jnp.zeros_like(x),
        x,
        solver=rdeq.Reversible(0.5, state_dtype=jnp.float32),
        max_steps=6,
        tol=0.0,
    )
    assert float(err32["abs"]) > 1e-3

    def loss(x, adjoint):
        sol = rdeq.fixed_point(
            block, jnp.zeros_like(x), x, solver=solver, adjoint=adjoint, max_steps=6, tol=0.0
        )
        return jnp.sum(sol.value.astype(jnp.float32) ** 2)

    g_rev = jax.grad(loss)(x, rdeq.ReversibleAdjoint())
    g_ref = jax.grad(loss)(x, rdeq.UnrolledAdjoint())
    assert g_rev.dtype == jnp.bfloat16
    # Same values up to the order in which bf16 cotangents are summed (autodiff's order
    # inside a transposed scan is not reproduced bit for bit): a few bf16 ulps.
    assert tree_rel_error(g_rev, g_ref) <= 1e-2
