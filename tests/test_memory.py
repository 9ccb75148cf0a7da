"""Memory of the compiled gradient does not grow with depth for `ReversibleAdjoint` with a
floating state (the exact state adds its information buffer, a few bits per element per
step: `test_exact_state.py::test_exact_memory_bound`).

Compiled memory (`memory_analysis()`) is deterministic, unlike timings."""

import equinox as eqx
import jax
import jax.numpy as jnp

import revdeq_jax as rdeq

from .helpers import make_block, tree_rel_error


def _temp_bytes(adjoint, steps, block, x):
    params, static = eqx.partition(block, eqx.is_inexact_array)

    def loss(params, x):
        sol = rdeq.fixed_point(
            eqx.combine(params, static),
            jnp.zeros_like(x),
            x,
            solver=rdeq.Reversible(0.5, state_dtype=None),
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


def test_vmapped_solve_does_not_carry_per_example_parameter_cotangents(getkey):
    """Letting `vmap` batch the reversible backward loop (`vmap_backward="per_example"`)
    makes it carry one parameter cotangent per example; the batch rule, like one
    solve with a batched `fn`, sums them inside each VJP. Same gradient, and the
    batch x params accumulator is gone from compiled memory."""
    block, x = make_block("attention", key=getkey(), dtype=jnp.float32)
    params, static = eqx.partition(block, eqx.is_inexact_array)
    xs = x[None] * jnp.arange(1.0, 33.0)[:, None, None]  # batch of 32

    def vmapped(rule):
        def loss(p, xs):
            layer = eqx.combine(p, static)
            adjoint = rdeq.ReversibleAdjoint(vmap_backward=rule)
            one = lambda x: rdeq.fixed_point(
                layer, jnp.zeros_like(x), x, adjoint=adjoint, max_steps=8, tol=0.0
            )
            return jnp.sum(jax.vmap(one)(xs).value ** 2)

        return loss

    def batched(p, xs):
        layer = eqx.filter_vmap(eqx.combine(p, static))
        sol = rdeq.fixed_point(layer, jnp.zeros_like(xs), xs, max_steps=8, tol=0.0)
        return jnp.sum(sol.value**2)

    losses = {"per_example": vmapped("per_example"), "batch": vmapped("batch"), "fn": batched}
    grads = {k: jax.jit(jax.grad(f))(params, xs) for k, f in losses.items()}
    assert tree_rel_error(grads["batch"], grads["per_example"]) <= 1e-5
    assert tree_rel_error(grads["fn"], grads["per_example"]) <= 1e-5
    temp = {
        k: jax.jit(jax.grad(f)).lower(params, xs).compile().memory_analysis().temp_size_in_bytes
        for k, f in losses.items()
    }
    param_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    # The per-example rule holds (at least) 32 parameter cotangents more...
    assert temp["per_example"] - temp["fn"] >= 32 * param_bytes, (temp, param_bytes)
    # ...the batch rule less than one more than the batched `fn` (measured: a few KB).
    assert temp["batch"] - temp["fn"] < param_bytes, (temp, param_bytes)
