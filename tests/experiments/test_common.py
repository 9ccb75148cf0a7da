"""Tests for `experiments.common`: config, checkpoints, metrics, loop, sharding."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from experiments.common import (
    adamw_cosine,
    CheckpointManager,
    config_from_dict,
    config_to_dict,
    count_params,
    load_checkpoint,
    LoopSpec,
    make_mesh,
    MetricsLogger,
    NonFiniteLossError,
    parse_config,
    plot_metrics,
    plot_series,
    read_header,
    read_metrics,
    replicate,
    save_checkpoint,
    shard_batch,
    train_loop,
    TrainState,
    warmup_cosine,
)


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _leaves_equal(a, b) -> bool:
    """Bit-exact equality of the array leaves (and structure, dtypes) of two PyTrees."""
    la, ta = jax.tree.flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b, eqx.is_array))
    if ta != tb or len(la) != len(lb):
        return False
    la = [jr.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in la]
    lb = [jr.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in lb]
    return all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


# ======================================================================================
# config
# ======================================================================================


@dataclasses.dataclass(frozen=True)
class _Cfg:
    lr: float = 3e-4
    steps: int = 100
    name: str = "run"
    resume: bool = False
    widths: tuple[int, ...] = (8, 16)
    pair: tuple[int, float] = (1, 0.5)
    dropout: float | None = None
    solver: Literal["reversible", "anderson"] = "reversible"
    workdir: pathlib.Path = pathlib.Path("runs/x")


_REGISTRY = {"tiny": _Cfg(steps=10), "small": _Cfg()}


def test_parse_config_converts_types(capsys):
    argv = [
        "--config=tiny",
        "--lr=1e-3",
        "--steps=200",
        "--widths=1,2,3",
        "--pair=3,0.25",
        "--resume",
        "--dropout=0.1",
        "--solver=anderson",
        "--workdir=runs/y",
        "--name=abc",
    ]
    config, overrides = parse_config(_REGISTRY, argv, default="small")
    assert config == _Cfg(
        lr=1e-3,
        steps=200,
        name="abc",
        resume=True,
        widths=(1, 2, 3),
        pair=(3, 0.25),
        dropout=0.1,
        solver="anderson",
        workdir=pathlib.Path("runs/y"),
    )
    assert type(config.lr) is float and type(config.steps) is int
    assert type(config.widths) is tuple and all(type(w) is int for w in config.widths)
    assert set(overrides) == {
        "lr",
        "steps",
        "widths",
        "pair",
        "resume",
        "dropout",
        "solver",
        "workdir",
        "name",
    }
    assert overrides["widths"] == (1, 2, 3)
    out = capsys.readouterr().out
    assert "override steps = 200 (was 10)" in out  # base was "tiny", not the default


def test_parse_config_default_and_none(capsys):
    config, overrides = parse_config(_REGISTRY, ["--dropout=none", "--steps=1e3"], default="small")
    assert config == _Cfg(dropout=None, steps=1000)
    assert overrides == {"dropout": None, "steps": 1000}
    config, overrides = parse_config(_REGISTRY, [], default="tiny")
    assert config == _REGISTRY["tiny"]
    assert overrides == {}
    assert (
        capsys.readouterr().out
        == "override dropout = None (was None)\noverride steps = 1000 (was 100)\n"
    )


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("1", True), ("True", True), ("false", False), ("0", False)],
)
def test_parse_config_bools(text, expected):
    config, _ = parse_config(_REGISTRY, [f"--resume={text}"], default="small")
    assert config.resume is expected


def test_parse_config_unknown_key_suggests():
    with pytest.raises(
        ValueError,
        match=r"unknown config key 'lrr'.*Did you mean 'lr'\?.*Valid keys: lr, steps",
    ):
        parse_config(_REGISTRY, ["--lrr=1e-3"], default="small")
    with pytest.raises(ValueError, match=r"unknown config 'tinyy'.*Did you mean 'tiny'"):
        parse_config(_REGISTRY, ["--config=tinyy"], default="small")


@pytest.mark.parametrize(
    "arg, pattern",
    [
        ("--steps=abc", r"bad value 'abc' for --steps: expected int"),
        ("--steps=1.5", r"for --steps: expected int"),
        ("--lr=fast", r"for --lr: expected float"),
        ("--resume=maybe", r"for --resume: expected bool"),
        ("--widths=1,x", r"for --widths: expected tuple\[int, \.\.\.\]"),
        (
            "--pair=1,2,3",
            r"for --pair: expected tuple\[int, float\] \(expected 2 comma-separated",
        ),
        ("--dropout=lots", r"for --dropout: expected float \| None"),
        ("--solver=broyden", r"for --solver: expected one of 'reversible', 'anderson'"),
        ("--lr", r"--lr needs a value"),
        ("lr=1", r"unexpected argument 'lr=1'"),
    ],
)
def test_parse_config_bad_values(arg, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_config(_REGISTRY, [arg], default="small")


def test_parse_config_help(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(_REGISTRY, ["--config=tiny", "--help"], default="small")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "config 'tiny'" in out and "steps" in out and "= 10  (int)" in out
    assert "widths" in out and "(tuple[int, ...])" in out


def test_config_json_round_trip():
    config = _Cfg(widths=(3, 4), pair=(2, 1.5), dropout=0.25, solver="anderson")
    d = json.loads(json.dumps(config_to_dict(config)))
    assert d["widths"] == [3, 4] and d["workdir"] == "runs/x"
    back = config_from_dict(_Cfg, d)
    assert back == config
    assert type(back.widths) is tuple and type(back.pair[1]) is float
    assert config_from_dict(_Cfg, {"steps": 5}) == _Cfg(steps=5)  # missing keys take defaults
    with pytest.raises(ValueError, match=r"unknown keys \['stepz'\].*Did you mean 'steps'"):
        config_from_dict(_Cfg, {"stepz": 5})
    with pytest.raises(ValueError, match="steps: expected int"):
        config_from_dict(_Cfg, {"steps": "5"})


# ======================================================================================
# checkpoints
# ======================================================================================


@eqx.filter_jit  # one compilation instead of many eager ops
def _mlp_and_adamw(key):
    model = eqx.nn.MLP(3, 2, 8, 2, key=key)
    optimizer = optax.adamw(1e-2)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)  # non-zero moments, count = 1
    return eqx.apply_updates(model, updates), opt_state


def test_checkpoint_round_trip_bit_exact(tmp_path):
    model, opt_state = _mlp_and_adamw(jr.key(0))
    tree = {
        "model": model,
        "opt_state": opt_state,
        "key": jr.key(7),
        "step": jnp.asarray(3, jnp.int32),
    }
    header = {"config": {"lr": 1e-3, "widths": [1, 2]}, "step": 3}
    path = tmp_path / "sub" / "ckpt.eqx"
    save_checkpoint(path, tree, header)

    like_model, like_opt = _mlp_and_adamw(jr.key(1))  # different values, same structure
    like = {
        "model": like_model,
        "opt_state": like_opt,
        "key": jr.key(0),
        "step": jnp.asarray(0, jnp.int32),
    }
    assert not _leaves_equal(like, tree)
    loaded, loaded_header = load_checkpoint(path, like)
    assert loaded_header == header == read_header(path)
    assert _leaves_equal(loaded, tree)
    counts = [
        x for x in jax.tree.leaves(loaded["opt_state"]) if jnp.issubdtype(x.dtype, jnp.integer)
    ]
    assert counts and all(int(c) == 1 for c in counts)
    assert np.array_equal(jr.key_data(loaded["key"]), jr.key_data(tree["key"]))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.eqx"]  # no temp files left


def test_checkpoint_round_trip_batchnorm_state(tmp_path):
    model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, axis_name="batch", mode="ema")
    x = jr.normal(jr.key(0), (16, 4)) * 3.0 + 1.0
    _, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    train_state = TrainState(model=model, opt_state=(), step=5, model_state=state)
    save_checkpoint(tmp_path / "bn.eqx", train_state, {"step": 5})

    _, fresh_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, axis_name="batch", mode="ema")
    like = TrainState(model=model, opt_state=(), step=0, model_state=fresh_state)
    assert not _leaves_equal(like, train_state)  # the running statistics moved
    loaded, _ = load_checkpoint(tmp_path / "bn.eqx", like)
    assert _leaves_equal(loaded, train_state)
    assert int(loaded.step) == 5


def test_checkpoint_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.eqx"
    save_checkpoint(path, {"w": jnp.arange(4.0)}, {"step": 1})
    original = path.read_bytes()

    def _boom(f, tree, **kwargs):
        f.write(b"partial garbage")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", _boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(path, {"w": jnp.zeros(4)}, {"step": 2})
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.eqx"]

    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "other.eqx", {"w": jnp.zeros(4)}, {"bad": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.eqx"]


def test_checkpoint_mismatched_skeleton(tmp_path):
    path = tmp_path / "ckpt.eqx"
    save_checkpoint(path, {"w": jnp.zeros(4)}, {"step": 1})
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(path, {"w": jnp.zeros(5)})
    with pytest.raises(ValueError, match="more data than the skeleton"):
        load_checkpoint(path, {})
    (tmp_path / "junk.eqx").write_bytes(b"\x93NUMPY not a header\n")
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_header(tmp_path / "junk.eqx")


def test_checkpoint_manager(tmp_path):
    manager = CheckpointManager(tmp_path / "run")
    assert manager.latest_path() is None and manager.best_path() is None
    manager.save({"w": jnp.ones(2)}, {"step": 1})
    assert manager.latest_path() == tmp_path / "run" / "latest.eqx" and manager.best_path() is None
    manager.save({"w": jnp.full(2, 2.0)}, {"step": 2}, best=True)
    manager.save({"w": jnp.full(2, 3.0)}, {"step": 3})
    assert read_header(manager.latest_path())["step"] == 3
    assert read_header(manager.best_path())["step"] == 2
    best, _ = load_checkpoint(manager.best_path(), {"w": jnp.zeros(2)})
    assert np.array_equal(best["w"], np.full(2, 2.0, np.float32))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.eqx",
        "latest.eqx",
    ]


# ======================================================================================
# metrics and plots
# ======================================================================================


def test_metrics_round_trip(tmp_path):
    logger = MetricsLogger(tmp_path / "run")  # a directory: -> run/metrics.jsonl
    assert logger.path == tmp_path / "run" / "metrics.jsonl"
    logger.log(
        1,
        "train",
        loss=jnp.asarray(1.5),
        nfe=np.int32(7),
        flag=np.bool_(True),
        hist=jnp.arange(3),
    )
    logger.log(2, "val", loss=float("nan"), ppl=4)
    records = read_metrics(logger.path)
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "val")]
    assert records[0]["loss"] == 1.5 and type(records[0]["loss"]) is float
    assert records[0]["nfe"] == 7 and type(records[0]["nfe"]) is int
    assert records[0]["flag"] is True and records[0]["hist"] == [0, 1, 2]
    assert np.isnan(records[1]["loss"]) and records[1]["ppl"] == 4
    assert all(isinstance(r["time"], float) for r in records)
    with pytest.raises(ValueError, match="reserved"):
        logger.log(3, "train", time=1.0)

    with open(logger.path, "a") as f:
        f.write('{"step": 3, "spl')  # a line cut short by a crash
    assert len(read_metrics(tmp_path / "run")) == 2
    assert logger.truncate(after_step=1) == 1
    assert [r["step"] for r in read_metrics(logger.path)] == [1]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_pngs(tmp_path):
    logger = MetricsLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 11):
        logger.log(step, "train", loss=1.0 / step)
        if step % 5 == 0:
            logger.log(step, "val", loss=1.2 / step, ppl=float(np.exp(1.2 / step)))
    out = plot_metrics(
        tmp_path / "metrics.jsonl",
        tmp_path / "plots" / "curves.png",
        panels={
            "loss": [("train", "loss"), ("val", "loss")],
            "ppl": [("val", "ppl")],
            "acc": [("val", "acc")],
        },
    )
    assert out == tmp_path / "plots" / "curves.png"
    width, height = _png_size(out)
    assert width > height > 100  # three panels side by side

    out = plot_series(
        {"a": ([1, 2, 3], [1.0, 0.5, 0.25]), "b": ([1, 3], [2.0, 1.0])},
        tmp_path / "s.png",
        xlabel="step",
        ylabel="loss",
        title="t",
        logy=True,
    )
    assert min(_png_size(out)) > 100
    with pytest.raises(ValueError, match="values <= 0"):
        plot_series(
            {"a": ([1, 2], [1.0, -1.0])},
            tmp_path / "bad.png",
            xlabel="x",
            ylabel="y",
            title="t",
            logy=True,
        )
    with pytest.raises(ValueError, match="2 x values but 1 y values"):
        plot_series(
            {"a": ([1, 2], [1.0])},
            tmp_path / "bad.png",
            xlabel="x",
            ylabel="y",
            title="t",
        )
    assert not (tmp_path / "bad.png").exists()


# ======================================================================================
# optimiser
# ======================================================================================


def test_warmup_cosine_schedule():
    schedule = warmup_cosine(1.0, warmup_steps=4, total_steps=12, final_lr_ratio=0.1)
    values = [float(schedule(i)) for i in (0, 2, 4, 8, 12, 20)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(1.0, warmup_steps=13, total_steps=12)


def test_adamw_cosine_decays_matrices_only_and_clips():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    optimizer = adamw_cosine(0.5, warmup_steps=0, total_steps=10, weight_decay=0.1)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * np.ones((2, 2)), rtol=1e-6)
    assert np.array_equal(updates["b"], np.zeros(2))

    big = {"w": jnp.full((2, 2), 1e3), "b": jnp.full(2, 1e3)}
    clipped = adamw_cosine(0.5, warmup_steps=0, total_steps=10, weight_decay=0.0, clip_norm=1.0)
    free = adamw_cosine(0.5, warmup_steps=0, total_steps=10, weight_decay=0.0)
    state_c, state_f = clipped.init(params), free.init(params)
    _, state_c = clipped.update(big, state_c, params)
    _, state_f = free.update(big, state_f, params)
    mu_c = [x for x in jax.tree.leaves(state_c) if x.shape == (2, 2)][0]
    mu_f = [x for x in jax.tree.leaves(state_f) if x.shape == (2, 2)][0]
    # first moment = (1 - b1) * g: clipping scales g (global norm sqrt(6) * 1e3) down to
    # norm 1
    np.testing.assert_allclose(mu_f, 0.1 * 1e3 * np.ones((2, 2)), rtol=1e-5)
    np.testing.assert_allclose(mu_c, 0.1 * np.ones((2, 2)) / np.sqrt(6.0), rtol=1e-5)


def test_count_params():
    class _WithInts(eqx.Module):
        linear: eqx.nn.Linear
        table: jax.Array
        name: str = "x"

    model = _WithInts(eqx.nn.Linear(3, 4, key=jr.key(0)), jnp.arange(10))
    assert count_params(model) == 3 * 4 + 4  # the int table and the string are not parameters


# ======================================================================================
# the training loop
# ======================================================================================

_W_TRUE = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)


def _get_batch(step: int, nan_from: int | None = None):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = x @ _W_TRUE + 0.1 * rng.normal(size=(16, 1)).astype(np.float32)
    if nan_from is not None and step >= nan_from:
        y = np.full_like(y, np.nan)
    return x, y


_OPTIMIZER = optax.adam(3e-2)


@eqx.filter_jit
def _train_step(state: TrainState, batch, key):
    dtype = state.model.weight.dtype
    x, y = (jnp.asarray(a, dtype) for a in batch)
    x = x + 0.01 * jr.normal(key, x.shape, dtype)  # uses the per-step key, so resume must replay it

    def _loss(model):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    loss, grads = eqx.filter_value_and_grad(_loss)(state.model)
    return state.apply_gradients(grads, _OPTIMIZER), {
        "loss": loss,
        "nfe": jnp.asarray(4, jnp.int32),
    }


@eqx.filter_jit
def _train_step_no_increment(state: TrainState, batch, key):
    new_state, metrics = _train_step(state, batch, key)
    return eqx.tree_at(lambda s: s.step, new_state, state.step), metrics


_VAL = _get_batch(10_000)


def _evaluate(state: TrainState) -> dict[str, float]:
    x, y = (jnp.asarray(a, state.model.weight.dtype) for a in _VAL)
    return {"loss": float(jnp.mean((jax.vmap(state.model)(x) - y) ** 2))}


def _fresh_state() -> TrainState:
    return TrainState.create(eqx.nn.Linear(4, 1, key=jr.key(0)), _OPTIMIZER)


def _run(
    workdir,
    total,
    *,
    resume=False,
    state=None,
    train_step=_train_step,
    get_batch=_get_batch,
    log_every=2,
    eval_every=4,
    checkpoint_every=3,
    progress=False,
    evaluate=_evaluate,
):
    spec = LoopSpec(
        total_steps=total,
        log_every=log_every,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        workdir=workdir,
        seed=0,
    )
    return train_loop(
        spec=spec,
        state=_fresh_state() if state is None else state,
        train_step=train_step,
        get_batch=get_batch,
        evaluate=evaluate,
        header={"config": {"lr": 3e-2}, "run": "toy"},
        resume=resume,
        unit_name="examples",
        units_per_step=16,
        progress=progress,
    )


def test_loop_resume_is_exact(tmp_path, capsys):
    full = _run(tmp_path / "full", 12, progress=True)
    assert int(full.step) == 12
    assert not _leaves_equal(full.model, _fresh_state().model)  # it trained

    half = _run(tmp_path / "split", 6)
    assert read_header(tmp_path / "split" / "latest.eqx")["step"] == 6
    resumed = _run(tmp_path / "split", 12, resume=True)
    assert "resumed from" in capsys.readouterr().out
    assert int(resumed.step) == 12
    assert not _leaves_equal(half.model, resumed.model)
    assert _leaves_equal(resumed, full)  # model, optimiser state and step, bit for bit

    records = read_metrics(tmp_path / "split")
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if r["split"] == "val"] == [4, 6, 8, 12]
    assert all(r["nfe"] == 4 for r in records if r["split"] == "train")
    timed = [r for r in records if "ms_per_step" in r]
    assert timed and all(r["ms_per_step"] > 0 and r["examples_per_s"] > 0 for r in timed)
    assert "ms_per_step" not in records[0]  # step 2: compilation, not timed

    assert json.loads((tmp_path / "split" / "config.json").read_text()) == {
        "config": {"lr": 3e-2},
        "run": "toy",
    }
    latest = read_header(tmp_path / "split" / "latest.eqx")
    assert latest["config"] == {"lr": 3e-2} and latest["step"] == 12
    val_losses = {r["step"]: r["loss"] for r in records if r["split"] == "val"}
    best_step = min(val_losses, key=val_losses.get)
    best = read_header(tmp_path / "split" / "best.eqx")
    assert best["best"] == {
        "key": "loss",
        "mode": "min",
        "value": val_losses[best_step],
        "step": best_step,
    }
    assert best["step"] == best_step


def test_loop_resume_after_crash_and_interrupt(tmp_path):
    full = _run(tmp_path / "full", 12, progress=False)

    def _crashing_batch(step):
        if step == 8:
            raise OSError("data server went away")
        return _get_batch(step)

    with pytest.raises(
        OSError, match="went away"
    ):  # no evaluation: it would also save on improvement
        _run(tmp_path / "crash", 12, get_batch=_crashing_batch, evaluate=None)
    assert read_header(tmp_path / "crash" / "latest.eqx")["step"] == 6  # checkpoint_every=3
    assert (
        max(r["step"] for r in read_metrics(tmp_path / "crash")) == 8
    )  # logged past the checkpoint

    def _interrupting_batch(step):
        if step == 10:
            raise KeyboardInterrupt
        return _get_batch(step)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "crash", 12, resume=True, get_batch=_interrupting_batch)
    assert read_header(tmp_path / "crash" / "latest.eqx")["step"] == 10  # saved on interrupt
    resumed = _run(tmp_path / "crash", 12, resume=True)
    assert _leaves_equal(resumed, full)
    train_steps = [r["step"] for r in read_metrics(tmp_path / "crash") if r["split"] == "train"]
    assert train_steps == [
        2,
        4,
        6,
        8,
        10,
        12,
    ]  # stale records from the crashed run were dropped


@pytest.mark.parametrize("log_every, caught_at", [(1, 8), (100, 10)])
def test_loop_non_finite_loss(tmp_path, log_every, caught_at):
    def _nan_batch(step):
        return _get_batch(step, nan_from=7)

    with pytest.raises(NonFiniteLossError, match=rf"at step {caught_at}.*still holds step 5"):
        _run(
            tmp_path,
            20,
            get_batch=_nan_batch,
            log_every=log_every,
            checkpoint_every=5,
            eval_every=100,
        )
    assert issubclass(NonFiniteLossError, RuntimeError)
    assert read_header(tmp_path / "latest.eqx")["step"] == 5
    good, _ = load_checkpoint(tmp_path / "latest.eqx", _fresh_state())
    assert int(good.step) == 5
    assert all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree.leaves(eqx.filter(good, eqx.is_inexact_array))
    )
    reference = _run(tmp_path / "ref", 5, progress=False, evaluate=None)
    assert _leaves_equal(good, reference)


@eqx.filter_jit
def _train_step_poisoned(state: TrainState, batch, key):
    """The loss is finite, but from step 7 the update leaves NaN parameters behind."""
    x, y, scale = batch
    new_state, metrics = _train_step(state, (x, y), key)
    model = jax.tree.map(lambda p: p * scale, new_state.model)
    return eqx.tree_at(lambda s: s.model, new_state, model), metrics


def test_loop_non_finite_parameters_are_not_saved(tmp_path):
    def _batch(step):
        return (*_get_batch(step), np.float32(np.nan if step >= 6 else 1.0))

    with pytest.raises(NonFiniteLossError, match=r"parameters.*non-finite.*at step 7"):
        _run(
            tmp_path,
            20,
            train_step=_train_step_poisoned,
            get_batch=_batch,
            log_every=100,
            checkpoint_every=7,
            eval_every=100,
            evaluate=None,
        )
    assert not (tmp_path / "latest.eqx").exists()  # the only save point had a bad state


def test_loop_owns_the_step_counter(tmp_path):
    state = _run(tmp_path, 5, train_step=_train_step_no_increment, evaluate=None)
    assert int(state.step) == 5
    assert read_header(tmp_path / "latest.eqx")["step"] == 5
    loaded, _ = load_checkpoint(tmp_path / "latest.eqx", _fresh_state())
    assert int(loaded.step) == 5


def test_loop_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="best_mode"):
        train_loop(
            spec=LoopSpec(4, 1, 1, 1, tmp_path, 0),
            state=_fresh_state(),
            train_step=_train_step,
            get_batch=_get_batch,
            evaluate=None,
            header={},
            resume=False,
            best_mode="lowest",
        )
    with pytest.raises(ValueError, match="log_every"):
        LoopSpec(
            total_steps=4,
            log_every=0,
            eval_every=1,
            checkpoint_every=1,
            workdir=tmp_path,
            seed=0,
        )
    with pytest.raises(TypeError, match="`header` must be JSON-serialisable"):
        train_loop(
            spec=LoopSpec(4, 1, 1, 1, tmp_path, 0),
            state=_fresh_state(),
            train_step=_train_step,
            get_batch=_get_batch,
            evaluate=None,
            header={"x": object()},
            resume=False,
        )
    assert not (tmp_path / "config.json").exists()


# ======================================================================================
# sharding
# ======================================================================================


def test_sharding_single_device():
    mesh = make_mesh()
    assert mesh.axis_names == ("data",)
    batch = shard_batch({"x": np.ones((4, 2), np.float32)}, mesh)
    assert isinstance(batch["x"], jax.Array) and batch["x"].shape == (4, 2)
    assert replicate({"w": np.zeros(3), "n": 1}, mesh)["n"] == 1
    with pytest.raises(ValueError, match="leading batch axis"):
        shard_batch(np.float32(1.0), mesh)
    with pytest.raises(ValueError, match="between 1 and"):
        make_mesh(len(jax.devices()) + 1)


_SHARDING_SCRIPT = textwrap.dedent(
    """
    import sys
    assert "jax" not in sys.modules
    import jax, jax.numpy as jnp, numpy as np
    from experiments.common.sharding import (
        batch_sharding, make_mesh, replicate, shard_batch,
    )

    assert jax.device_count() == 4, jax.devices()
    mesh = make_mesh()
    assert mesh.shape["data"] == 4 and make_mesh(2).shape["data"] == 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=(8,)).astype(np.float32)
    batch = shard_batch({"x": x, "y": y}, mesh)
    assert batch["x"].sharding.is_equivalent_to(batch_sharding(mesh), 2)
    shards = sorted(batch["x"].addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 4 and len({s.device for s in shards}) == 4
    for i, shard in enumerate(shards):
        assert shard.data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(shard.data), x[2 * i : 2 * i + 2])
    w = replicate(jnp.asarray([0.5, -1.0, 2.0]), mesh)
    assert w.sharding.is_fully_replicated and len(w.sharding.device_set) == 4

    @jax.jit
    def step(w, b):
        loss, g = jax.value_and_grad(lambda w: jnp.mean((b["x"] @ w - b["y"]) ** 2))(w)
        return w - 0.1 * g, loss

    w_sharded, loss_sharded = step(w, batch)
    plain = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    w_plain, loss_plain = step(jnp.asarray([0.5, -1.0, 2.0]), plain)
    np.testing.assert_allclose(np.asarray(w_sharded), np.asarray(w_plain), rtol=1e-6)
    np.testing.assert_allclose(float(loss_sharded), float(loss_plain), rtol=1e-6)
    try:
        shard_batch({"x": np.zeros((6, 3))}, mesh)
    except ValueError as e:
        assert "batch size 6" in str(e) and "number of devices 4" in str(e), e
    else:
        raise AssertionError("no ValueError for a batch of 6 over 4 devices")
    print("SHARDING OK")
    """
)


def test_sharding_four_host_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", _SHARDING_SCRIPT],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDING OK" in result.stdout


_SHARDED_LOOP_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys
    import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr, numpy as np, optax
    from experiments.common import (
        LoopSpec, TrainState, load_checkpoint, make_mesh, replicate, shard_batch,
        train_loop,
    )

    assert jax.device_count() == 4
    tmp = pathlib.Path(sys.argv[1])
    mesh = make_mesh()
    optimizer = optax.adam(1e-2)

    @eqx.filter_jit
    def train_step(state, batch, key):
        x, y = batch
        x = x + 0.01 * jr.normal(key, x.shape)
        loss_fn = lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2)
        loss, grads = eqx.filter_value_and_grad(loss_fn)(state.model)
        return state.apply_gradients(grads, optimizer), {"loss": loss}

    def get_batch(step):
        x = np.random.default_rng(step).normal(size=(8, 3)).astype(np.float32)
        return shard_batch((x, x.sum(axis=1, keepdims=True)), mesh)

    def fresh():
        model = eqx.nn.Linear(3, 1, key=jr.key(0))
        return replicate(TrainState.create(model, optimizer), mesh)

    def run(workdir, total, resume):
        spec = LoopSpec(total, log_every=1, eval_every=100, checkpoint_every=2,
                        workdir=workdir, seed=0)
        return train_loop(spec=spec, state=fresh(), train_step=train_step,
                          get_batch=get_batch, evaluate=None, header={}, resume=resume,
                          unit_name="examples", units_per_step=8, progress=False)

    full = run(tmp / "full", 4, False)
    assert len(full.model.weight.sharding.device_set) == 4
    run(tmp / "split", 2, False)
    loaded, _ = load_checkpoint(tmp / "split" / "latest.eqx", fresh())
    sharding = loaded.model.weight.sharding
    assert sharding.is_fully_replicated and len(sharding.device_set) == 4, sharding
    resumed = run(tmp / "split", 4, True)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("SHARDED LOOP OK")
    """
)


@pytest.mark.slow
def test_loop_on_four_host_devices_resumes_exactly(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_LOOP_SCRIPT, str(tmp_path)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED LOOP OK" in result.stdout
