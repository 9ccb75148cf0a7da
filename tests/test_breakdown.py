"""Documents where exactness ends, and that `reconstruction_error` tells.

Reversal amplifies rounding by about 1/|1-beta| times the Jacobian's growth per step. On
the attention block at beta = 0.8 in float64 the reversible gradient is exact to ~1e-12 at
4 steps and wrong at 16 (measured: relative error ~1, reconstruction error ~1e2). This test
keeps that breakdown visible instead of hiding it behind a loose tolerance, and checks
that the reconstruction error, which a user can compute, is large exactly when the
gradient error is.
"""

import jax
import jax.numpy as jnp

import revdeq_jax as rdeq

from .helpers import make_block, tree_rel_error
from .test_exactness import _grads


def test_reconstruction_error_flags_gradient_error(x64, getkey):
    block, x = make_block("attention", key=getkey(), dtype=jnp.float64)
    z0 = jnp.zeros_like(x)
    solver = rdeq.Reversible(0.8)
    rows = {}
    adjoint = rdeq.ReversibleAdjoint(on_mismatch="ignore")  # to measure the breakdown
    for steps in [4, 16]:
        g_rev, _ = _grads(block, x, z0, solver, adjoint, steps)
        g_ref, _ = _grads(block, x, z0, solver, rdeq.UnrolledAdjoint(), steps)
        rec = rdeq.reconstruction_error(block, z0, x, solver=solver, max_steps=steps, tol=0.0)
        rows[steps] = (tree_rel_error(g_rev, g_ref), float(rec["rel"]))
    (grad4, rec4), (grad16, rec16) = rows[4], rows[16]
    assert grad4 < 1e-10 and rec4 < 1e-8, rows  # exact where the reconstruction is
    assert grad16 > 1e-3 and rec16 > 1e-2, rows  # broken, and the reconstruction says so
    assert rec16 > 1e6 * rec4 and grad16 > 1e6 * grad4, rows


def test_report_hook_gives_reconstruction_error_from_backward_pass(x64, getkey):
    block, x = make_block("attention", key=getkey(), dtype=jnp.float64)
    z0 = jnp.zeros_like(x)
    solver = rdeq.Reversible(0.8)
    reports = []
    adjoint = rdeq.ReversibleAdjoint(
        on_mismatch="ignore", report=lambda d: reports.append({k: float(v) for k, v in d.items()})
    )
    for steps in [16]:
        loss = lambda x: jnp.sum(
            rdeq.fixed_point(
                block, z0, x, solver=solver, adjoint=adjoint, max_steps=steps, tol=0.0
            ).value
        )
        jax.block_until_ready(jax.jit(jax.grad(loss))(x))
        rec = rdeq.reconstruction_error(block, z0, x, solver=solver, max_steps=steps, tol=0.0)
        # The same kind of program (a jitted gradient): `reconstruction_error` runs the
        # real backward pass; XLA compiles its loss differently, so the last bits may
        # differ and the drift amplifies them.
        assert 0.5 <= reports[-1]["abs"] / float(rec["abs"]) <= 2.0
        assert reports[-1]["mismatch"] and rec["mismatch"]  # and both flag it
    assert len(reports) == 1
    assert reports[0]["rel"] > 1e-2  # the broken case of the test above is flagged


def test_overflowed_reconstruction_is_reported_as_inf():
    """XLA's CPU max-reduction drops NaNs on large arrays (measured: `jnp.max` of 8192
    zeros and one NaN is 0), which made an overflowed reconstruction read as exact."""
    z0 = jnp.zeros(8192)
    broken = z0.at[5].set(jnp.nan)
    solver = rdeq.Reversible(0.5, state_dtype=None).prepare(z0, 4)
    check = jax.jit(lambda y, z: solver.reconstruction(y, z, z0, None))
    dev = check(broken, z0)
    assert float(dev["abs"]) == float("inf") and bool(dev["mismatch"])
    exact = check(z0, z0)
    assert float(exact["abs"]) == 0.0 and not bool(exact["mismatch"])
