"""`args` and `fn` may be any PyTree: arrays, functions, strings, ints, `None`.

Only the floating arrays among them are differentiated; everything else is static.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import revdeq_jax as rdeq


def _mlp(key):
    """An `eqx.nn.MLP` (its `activation` is a function leaf) scaled to a contraction."""
    mlp = eqx.nn.MLP(4, 4, 8, 1, key=key)
    return jtu.tree_map(lambda x: 0.3 * x if eqx.is_inexact_array(x) else x, mlp)


def _fn(z, a):
    block, x, label, n = a  # a Module holding a function, an array, a str, an int
    assert label == "block" and n == 3
    return block(z + x)


# Exact adjoints against each other (identical arithmetic up to summation order: 1e-5
# relative at float32); the implicit gradient at a converged solve (tol 1e-6) differs
# from them by the forward error times the conditioning, well under 1e-4.
_ADJOINTS = [
    (rdeq.Reversible(0.5), rdeq.ReversibleAdjoint(), 1e-5),
    (rdeq.Reversible(0.5, jnp.float32), rdeq.UnrolledAdjoint(), 1e-5),
    (rdeq.Reversible(0.5, jnp.float32), rdeq.CheckpointAdjoint(), 1e-5),
    (rdeq.Picard(), rdeq.ImplicitAdjoint(), 1e-4),
    (rdeq.Anderson(), rdeq.ImplicitAdjoint(), 1e-4),
]


@pytest.mark.parametrize(
    "solver, adjoint, rtol",
    _ADJOINTS,
    ids=[f"{type(s).__name__}-{type(a).__name__}" for s, a, _ in _ADJOINTS],
)
def test_args_with_function_leaves_under_jit_vmap_grad(solver, adjoint, rtol, getkey):
    mlp = _mlp(getkey())
    xs = jax.random.normal(getkey(), (2, 4))

    def loss(block, xs):
        def one(x):
            sol = rdeq.fixed_point(
                _fn,
                jnp.zeros(4),
                (block, x, "block", 3),
                solver=solver,
                adjoint=adjoint,
                max_steps=60,
                tol=1e-6,
            )
            return jnp.sum(sol.value**2)

        return jnp.sum(jax.vmap(one)(xs))

    grad = eqx.filter_jit(eqx.filter_grad(loss))(mlp, xs)

    # Reference: the same loss through plain autodiff of 60 Picard steps in float64.
    with jax.enable_x64(True):
        mlp64 = jtu.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, mlp)

        def ref_loss(block, xs):
            z = jnp.zeros_like(xs)
            for _ in range(60):
                z = jax.vmap(lambda z, x: block(z + x))(z, xs)
            return jnp.sum(z**2)

        ref = eqx.filter_grad(ref_loss)(mlp64, xs.astype(jnp.float64))
    for g, r in zip(jtu.tree_leaves(grad), jtu.tree_leaves(ref), strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * np.max(np.abs(r)))


def test_fn_module_with_function_leaf(getkey):
    """`fn` itself may hold non-array leaves (here an activation function)."""

    class Block(eqx.Module):
        mlp: eqx.nn.MLP
        act: Callable

        def __call__(self, z, x):
            return self.act(self.mlp(z) + x)

    block = Block(_mlp(getkey()), jnp.tanh)
    x = jnp.ones(4)
    sol = rdeq.fixed_point(block, jnp.zeros(4), x, solver=rdeq.Picard(), max_steps=60, tol=1e-6)
    np.testing.assert_allclose(block(sol.value, x), sol.value, atol=1e-5)
    grad = eqx.filter_grad(
        lambda b: jnp.sum(
            rdeq.fixed_point(b, jnp.zeros(4), x, solver=rdeq.Picard(), max_steps=60, tol=1e-6).value
        )
    )(block)
    assert grad.act is None
    assert all(jnp.all(jnp.isfinite(g)) for g in jtu.tree_leaves(grad))
