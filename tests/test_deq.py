"""`DEQ` composes inside user models under jit, vmap and grad."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revdeq_jax as rdeq

from .helpers import MLPBlock, tree_rel_error


class Model(eqx.Module):
    encoder: eqx.nn.Linear
    deq: rdeq.DEQ
    head: eqx.nn.Linear

    def __init__(self, *, key, adjoint=rdeq.ReversibleAdjoint(), solver=rdeq.Reversible(0.5)):
        k1, k2, k3 = jax.random.split(key, 3)
        self.encoder = eqx.nn.Linear(4, 16, key=k1)
        self.deq = rdeq.DEQ(
            MLPBlock(16, key=k2), solver=solver, adjoint=adjoint, max_steps=6, tol=1e-4
        )
        self.head = eqx.nn.Linear(16, 3, key=k3)

    def __call__(self, x):
        z, sol = self.deq(self.encoder(x), return_solution=True)
        return self.head(z), sol


def test_train_step_jit_vmap_grad(getkey):
    model = Model(key=getkey())
    xs = jax.random.normal(getkey(), (8, 4))
    ys = jax.random.randint(getkey(), (8,), 0, 3)
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, xs, ys):
        def loss_fn(model):
            logits, sol = jax.vmap(model)(xs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean(), sol

        (loss, sol), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = opt.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss, sol

    losses = []
    for _ in range(15):
        model, opt_state, loss, sol = step(model, opt_state, xs, ys)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    assert sol.num_steps.shape == (8,)
    assert sol.nfe.shape == (8,)
    assert jnp.all(sol.nfe == 1 + 2 * sol.num_steps)


def test_deq_gradient_equals_unrolled(x64, getkey):
    key = getkey()
    x = jax.random.normal(getkey(), (5, 4), jnp.float64)

    def loss(model):
        return jnp.sum(jax.vmap(lambda x: model(x)[0])(x) ** 2)

    to64 = lambda m: jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, m
    )
    m_rev = to64(Model(key=key))
    m_unr = eqx.tree_at(lambda m: m.deq.adjoint, m_rev, rdeq.UnrolledAdjoint())
    g_rev = eqx.filter_grad(loss)(m_rev)
    g_unr = eqx.filter_grad(loss)(m_unr)
    assert tree_rel_error(g_rev, g_unr) <= 1e-10


def test_deq_default_z0_and_explicit(getkey):
    deq = rdeq.DEQ(MLPBlock(16, key=getkey()), max_steps=30, tol=1e-6)
    x = jnp.ones(16)
    z_default = deq(x)
    z_explicit = deq(x, jnp.zeros(16))
    np.testing.assert_array_equal(z_default, z_explicit)
    np.testing.assert_allclose(deq.layer(z_default, x), z_default, atol=1e-5)
    with pytest.raises(ValueError, match="needs `z0` when `x` is not a single array"):
        rdeq.DEQ(lambda z, x: z + x[0], max_steps=2)((x, x))


def test_default_solver_is_exact_with_reversible_adjoint(getkey):
    """The default configuration gives exact gradients at depth: beta = 0.5 with the exact
    state under `ReversibleAdjoint`; a floating state under adjoints that need one."""
    layer = MLPBlock(16, key=getkey())
    deq = rdeq.DEQ(layer)
    assert deq.solver == rdeq.Reversible(0.5, state_dtype="auto")
    assert rdeq.DEQ(layer, adjoint=rdeq.UnrolledAdjoint()).solver == rdeq.Reversible(0.5)
    x = jnp.ones(16)
    z = deq(x)
    assert z.dtype == jnp.float32
    # Same forward pass as a float64 state, up to the 2**-32 grid and float32 rounding.
    z64 = rdeq.DEQ(layer, solver=rdeq.Reversible(0.5, state_dtype=jnp.float64))(x)
    np.testing.assert_allclose(z, z64, rtol=0, atol=1e-6)
