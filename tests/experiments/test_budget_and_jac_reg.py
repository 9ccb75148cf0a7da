"""The experiments' NFE sweeps (one compiled evaluation step, a traced `step_budget`) and the
`jac_reg` Jacobian regularisation of their training losses, on tiny configs."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import revdeq_jax as rdeq
from experiments.common import config as cfg
from experiments.language import evaluate as levaluate, train as ltrain
from experiments.language.configs import CONFIGS as LCONFIGS
from experiments.language.model import lm_loss, make_model
from experiments.vision import data as vdata, evaluate as vevaluate, train as vtrain
from experiments.vision.configs import CONFIGS as VCONFIGS
from revdeq_jax.nn import _implicit_resnet as implicit_resnet, VariationalDropout


def _counting(monkeypatch, module, name) -> list:
    """Replaces `module.name` with a wrapper that records each call (a trace, when it is
    called from inside a jitted function)."""
    calls, inner = [], getattr(module, name)

    def _wrapped(*args, **kwargs):
        calls.append(None)
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, name, _wrapped)
    return calls


def _with_max_steps(lm, steps):
    """The language model with its DEQ compiled for `steps` steps."""
    return eqx.tree_at(lambda m: m.deq, lm, dataclasses.replace(lm.deq, max_steps=steps))


# ----------------------------------------------------------------------------------------
# NFE sweeps
# ----------------------------------------------------------------------------------------


def test_language_sweep_compiles_once_and_matches_separate_compiles(monkeypatch):
    # A width of its own, so that no other test has compiled this evaluation step already.
    config = dataclasses.replace(LCONFIGS["tiny"], dim=24, max_steps=4, eval_batch_size=4)
    model = make_model(config, key=jr.key(0))
    tokens = np.random.default_rng(0).integers(0, 1000, 4 * config.seq_len + 1).astype(np.int32)
    steps = (1, 2, 4)

    traces = _counting(monkeypatch, ltrain, "lm_loss")
    sweep = levaluate.nfe_sweep(model, tokens, config, None, steps)
    assert len(traces) == 1  # three budgets, one compiled eval step

    for row, s in zip(sweep, steps):
        want = ltrain.evaluate(_with_max_steps(model, s), tokens, config, None)
        assert row == {"max_steps": s} | want  # to the bit: the same loop, stopped at s
    assert [row["nfe"] for row in sweep] == [3.0, 5.0, 9.0]  # 2 per reversible step, + f(z0)
    assert len(traces) == 1 + len(steps)  # the references did compile once each

    with pytest.raises(cfg.ConfigError, match="exceeds the model's max_steps=4"):
        levaluate.nfe_sweep(model, tokens, config, None, (2, 5))


def test_vision_sweep_compiles_once_and_matches_separate_compiles(monkeypatch):
    config = dataclasses.replace(VCONFIGS["tiny"], channels=(4, 8), width=(1, 1), max_steps=(2, 2))
    state = vtrain.init_state(config)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(16) % 10).astype(np.int32)
    steps = (1, 3)

    traces = _counting(monkeypatch, vtrain, "_forward")
    ceiling = vevaluate._with_max_steps(state.model, max(steps))
    sweep = vevaluate.nfe_sweep(ceiling, state.model_state, images, labels, 8, steps)
    assert len(traces) == 1

    for row, s in zip(sweep, steps):
        model = vevaluate._with_max_steps(state.model, s)
        want = vtrain.evaluate(model, state.model_state, images, labels, 8)
        assert row == {"max_steps": s} | want
    assert sweep[0]["nfe"] < sweep[1]["nfe"]


# ----------------------------------------------------------------------------------------
# Jacobian regularisation
# ----------------------------------------------------------------------------------------


def _lm_batch(config):
    x = np.random.default_rng(0).integers(0, 1000, (config.batch_size, config.seq_len + 1))
    return jnp.asarray(x[:, :-1], jnp.int32), jnp.asarray(x[:, 1:], jnp.int32)


def _lm_penalty(model, inputs, key, num_probes):
    """The penalty rebuilt from the model's parts, with the keys `lm_loss` documents: dropout
    from `split(key, batch)`, probes from `split(fold_in(key, 1), batch)`."""
    drop_keys = jr.split(key, inputs.shape[0])
    probe_keys = jr.split(jr.fold_in(key, 1), inputs.shape[0])

    def _one(ids, kd, kp):
        x = model.embed(ids)
        mask = VariationalDropout(model.dropout).mask((2, model.dim), key=kd, dtype=x.dtype)
        z = model.deq((x, mask), jnp.zeros_like(x))
        z = jax.lax.stop_gradient(z)
        return rdeq.jacobian_penalty(model.deq.layer, z, (x, mask), key=kp, num_probes=num_probes)

    return jnp.mean(jax.vmap(_one)(inputs, drop_keys, probe_keys))


def test_language_jac_reg_adds_the_penalty(monkeypatch):
    config = dataclasses.replace(
        LCONFIGS["tiny"], solver="anderson", adjoint="implicit", jac_reg=0.7, jac_reg_probes=2
    )
    cfg.validate(config)
    state = ltrain.init_state(config)
    batch, key = _lm_batch(config), jr.key(3)
    _, metrics = ltrain.make_train_step(config)(state, batch, key)

    loss = eqx.filter_jit(lambda m: lm_loss(m, *batch, key=key)[0])(state.model)
    penalty = eqx.filter_jit(_lm_penalty)(state.model, batch[0], key, 2)
    assert float(penalty) > 0
    np.testing.assert_allclose(metrics["jac_penalty"], penalty, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], loss + 0.7 * penalty, rtol=1e-5)

    # jac_reg = 0: the penalty is not even traced (tracing is enough to see it), nor reported.
    monkeypatch.setattr(rdeq, "jacobian_penalty", _never)
    off = ltrain.make_train_step(dataclasses.replace(config, jac_reg=0.0))
    _, metrics = eqx.filter_eval_shape(off, state, batch, key)
    assert "jac_penalty" not in metrics


def test_vision_jac_reg_adds_the_penalty(monkeypatch):
    # The single-scale DEQ-IFT model: no BatchNorm, so the loss rebuilds simply.
    config = dataclasses.replace(
        VCONFIGS["tiny"],
        model="single-scale",
        channels=(4,),
        width=(1,),
        max_steps=(3,),
        solver="anderson",
        adjoint="implicit",
        augment=False,
        jac_reg=0.4,
    )
    cfg.validate(config)
    state = vtrain.init_state(config)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "label": np.arange(4, dtype=np.int32),
    }
    key = jr.key(5)
    _, metrics = vtrain.make_train_step(config)(state, batch, key)

    def _rebuilt(model, images, labels, probe_keys):
        def _one(x, kp):
            h = model.encoder_norm(model.encoder(x))
            z = jax.lax.stop_gradient(model.block(h))
            return rdeq.jacobian_penalty(model.block.layer, z, h, key=kp)

        logits, _, _ = vtrain._forward(model, state.model_state, images)
        ce = jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])
        return ce, jnp.mean(jax.vmap(_one)(images, probe_keys))

    images = vdata.normalise(batch["image"])
    probe_keys = jr.split(jr.fold_in(key, 1), 4)
    ce, penalty = eqx.filter_jit(_rebuilt)(state.model, images, batch["label"], probe_keys)
    assert float(penalty) > 0
    np.testing.assert_allclose(metrics["loss"], ce + 0.4 * penalty, rtol=1e-5)

    monkeypatch.setattr(implicit_resnet, "jacobian_penalty", _never)
    off = vtrain.make_train_step(dataclasses.replace(config, jac_reg=0.0))
    _, metrics = eqx.filter_eval_shape(off, state, batch, key)
    assert "jac_penalty" not in metrics


def _never(*args, **kwargs):
    raise AssertionError("the Jacobian penalty was evaluated with jac_reg = 0")


@pytest.mark.parametrize(
    "config, message",
    [
        (dataclasses.replace(LCONFIGS["tiny"], model="explicit", jac_reg=1.0), "--model=deq"),
        (dataclasses.replace(VCONFIGS["tiny"], model="resnet18", jac_reg=1.0), "implicit-resnet"),
        (dataclasses.replace(LCONFIGS["tiny"], jac_reg=-1.0), "must be >= 0"),
        (dataclasses.replace(LCONFIGS["tiny"], jac_reg_probes=0), "must be >= 1"),
    ],
)
def test_jac_reg_config_errors(config, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.validate(config)
