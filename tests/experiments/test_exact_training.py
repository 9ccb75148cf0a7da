"""The experiments train with exact gradients by default.

The gradient of each experiment's loss, computed as its jitted train step computes it
(default config: reversible adjoint, the config's beta, `state_dtype="auto"`, i.e. the
bit-exact integer state for these float32 models), is compared with an independent
reference: the same model in float64 differentiated by autodiff through the stored loop
(`UnrolledAdjoint`, float64 state). Widths are small to keep the test fast; the block
types, beta and state are the default configs'. Dropout is off so that the two models draw
no random masks of different dtypes.

The backward pass's own reconstruction check runs with its default policy (raise), so a
reconstruction that missed would fail the test before any comparison.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import revdeq_jax as rdeq
from experiments.language.configs import CONFIGS as LM_CONFIGS
from experiments.language.model import lm_loss, make_model
from experiments.vision import train as vtrain
from experiments.vision.configs import CONFIGS as VISION_CONFIGS
from experiments.vision.models import build_model, to_dtype
from tests.helpers import tree_rel_error


BOUND = 1e-5  # float32 computation + the exact state's lattice rounding; measured below


def _floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def _params_grad(loss_fn, model):
    return eqx.filter_jit(eqx.filter_grad(loss_fn))(model)


def test_language_model_gradient_is_exact():
    config = dataclasses.replace(LM_CONFIGS["tiny"], dropout=0.0, max_steps=6, tol=0.0)
    assert config.adjoint == "reversible" and config.state_dtype == "auto"
    model = make_model(config, key=jr.key(0))
    assert isinstance(model.deq.solver.state_dtype, rdeq.AutoState)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 1000, (3, config.seq_len + 1)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss(m):
        return lm_loss(m, inputs, targets, inference=True)[0]

    g = _params_grad(loss, model)
    # Built with 64-bit types off (as the model itself), so the initial weights are equal.
    ref_model = make_model(
        dataclasses.replace(config, adjoint="unrolled", state_dtype=None), key=jr.key(0)
    )
    with jax.enable_x64(True):
        ref_model = _floats(ref_model, jnp.float64)
        g_ref = jax.tree.map(np.asarray, _params_grad(loss, ref_model))
    deq = lambda tree: tree.deq  # the equilibrium layer's parameters: what reversal affects
    err = tree_rel_error(deq(g), deq(g_ref))
    assert err <= BOUND, err  # measured: 1e-6 - 3e-6
    assert tree_rel_error(g, g_ref) <= BOUND


def test_multiscale_vision_model_gradient_is_exact():
    config = dataclasses.replace(VISION_CONFIGS["tiny"], max_steps=(6, 6), tol=0.0)
    assert config.model == "implicit-resnet" and config.beta == 0.8
    assert config.adjoint == "reversible" and config.state_dtype == "auto"
    model, state = build_model(config, jr.key(1))
    images = jr.normal(jr.key(3), (4, 3, 8, 8))  # 8x8 images keep it fast
    labels = jnp.arange(4) % 10

    def loss(m, state, images):
        logits, _, _ = vtrain._forward(m, state, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    g = eqx.filter_jit(eqx.filter_grad(loss))(model, state, images)
    ref_config = dataclasses.replace(config, adjoint="unrolled", state_dtype=None)
    ref_model, _ = build_model(ref_config, jr.key(1))  # the same initial weights
    with jax.enable_x64(True):
        ref_model = to_dtype(ref_model, jnp.float64)
        ref_state = to_dtype(build_model(ref_config, jr.key(1))[1], jnp.float64)  # 64-bit counters
        g_ref = eqx.filter_jit(eqx.filter_grad(loss))(
            ref_model, ref_state, images.astype(jnp.float64)
        )
        g_ref = jax.tree.map(np.asarray, g_ref)
    err = tree_rel_error(g, g_ref)
    assert err <= BOUND, err  # measured: see the commit
