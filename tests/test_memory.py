"""Memory of the compiled gradient does not grow with depth for `ReversibleAdjoint`.

Compiled memory (`memory_analysis()`) is deterministic, unlike timings."""

import equinox as eqx
import jax
import jax.numpy as jnp

import revdeq_jax as rdeq

from .helpers import make_block


def _temp_bytes(adjoint, steps, block, x):
    params, static = eqx.partition(block, eqx.is_inexact_array)

    def loss(params, x):
        sol = rdeq.fixed_point(
            eqx.combine(params, static),
            jnp.zeros_like(x),
            x,
            adjoint=adjoint,
            max_steps=steps,
            tol=0.0,
        )
        return jnp.sum(sol.value**2)

    xs = jnp.broadcast_to(x, (8, *x.shape))  # batched, as in training
    batched = lambda p, xs: jnp.sum(jax.vmap(lambda x: loss(p, x))(xs))
    compiled = jax.jit(jax.grad(batched)).lower(params, xs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_reversible_memory_flat_unrolled_grows(getkey):
    block, x = make_block("attention", key=getkey(), dtype=jnp.float32)
    rev4 = _temp_bytes(rdeq.ReversibleAdjoint(), 4, block, x)
    rev64 = _temp_bytes(rdeq.ReversibleAdjoint(), 64, block, x)
    unr4 = _temp_bytes(rdeq.UnrolledAdjoint(), 4, block, x)
    unr64 = _temp_bytes(rdeq.UnrolledAdjoint(), 64, block, x)
    assert abs(rev64 - rev4) <= 0.1 * rev4, (rev4, rev64)
    assert unr64 > 4 * unr4, (unr4, unr64)
    assert rev64 < unr64 / 4
