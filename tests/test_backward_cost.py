"""A backward step of `ReversibleAdjoint` evaluates `fn` exactly twice (forward) and pulls
back twice: counted as matrix multiplications in the traced program."""

import jax
import jax.extend
import jax.numpy as jnp

import revdeq_jax as rdeq


def _count(jaxpr, prim_name):
    """Counts equations of a primitive, recursing into sub-jaxprs (loops, pjit, ...)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == prim_name:
            n += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count(sub, prim_name)
    return n


def _while_bodies(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            out.append(eqn.params["body_jaxpr"].jaxpr)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out.extend(_while_bodies(sub))
    return out


def test_two_forward_two_backward_evaluations_per_step():
    w = jnp.eye(4) * 0.5

    def loss(w, x):
        fn = lambda z, x: jnp.tanh(w @ z + x)  # one dot_general per evaluation
        return jnp.sum(rdeq.fixed_point(fn, jnp.zeros(4), x, max_steps=5, tol=0.0).value)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(w, jnp.ones(4)).jaxpr
    bodies = _while_bodies(jaxpr)
    # Forward loop: 2 evaluations per step = 2 dots. Backward loop: 2 evaluations (each
    # one vjp whose primal output also drives the reconstruction) = 2 dots, plus the
    # transposes w.r.t. z and w, 2 dots each = 4 dots. A version that reconstructs with a
    # separate call of fn would show 8.
    counts = sorted(_count(b, "dot_general") for b in bodies)
    assert counts == [2, 6], counts
