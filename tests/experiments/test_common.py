"""Tests for `experiments.common`: config, checkpoints, run directories, metrics, sharding."""

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

from experiments.common import config as cfg
from experiments.common.checkpoint import (
    DamagedCheckpoint,
    load_checkpoint,
    MismatchedCheckpoint,
    read_header,
    save_checkpoint,
)
from experiments.common.metrics import MetricsLogger, read_metrics
from experiments.common.optim import count_params, make_optimizer, TrainState, warmup_cosine
from experiments.common.plotting import plot_metrics, plot_series
from experiments.common.run import NonFiniteError, Run, RunError
from experiments.common.sharding import make_mesh, replicate, shard_batch


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
    train_steps: int = 100
    warmup_steps: int = 0
    name: str = "run"
    augment: bool = False
    width: tuple[int, ...] = (8, 16)
    dropout: float | None = None
    solver: Literal["reversible", "anderson"] = "reversible"
    adjoint: Literal["reversible", "implicit"] = "reversible"
    data_dir: str | None = None
    dim: int = 16
    num_heads: int = 4


_REGISTRY = {"tiny": _Cfg(train_steps=10), "small": _Cfg()}


def test_overrides_convert_types():
    argv = [
        "--lr=1e-3",
        "--train-steps=200",
        "--width=1,2,3",
        "--augment",
        "--dropout=0.1",
        "--solver=anderson",
        "--data_dir=runs/y",
        "--name=abc",
    ]
    config, values = cfg.apply_overrides(_REGISTRY["tiny"], cfg.split_args(argv))
    assert config == _Cfg(
        lr=1e-3,
        train_steps=200,
        name="abc",
        augment=True,
        width=(1, 2, 3),
        dropout=0.1,
        solver="anderson",
        data_dir="runs/y",
    )
    assert type(config.lr) is float and type(config.train_steps) is int
    assert type(config.width) is tuple and all(type(w) is int for w in config.width)
    assert set(values) == {
        "lr",
        "train_steps",
        "width",
        "augment",
        "dropout",
        "solver",
        "data_dir",
        "name",
    }
    assert values["width"] == (1, 2, 3)


def test_from_args_default_and_none():
    config = cfg.from_args(["--dropout=none", "--train_steps=1e3"], _REGISTRY, "small")
    assert config == _Cfg(dropout=None, train_steps=1000)
    assert cfg.from_args([], _REGISTRY, "tiny") == _REGISTRY["tiny"]
    assert cfg.from_args(["--config=tiny", "--lr=1"], _REGISTRY, "small") == _Cfg(
        train_steps=10, lr=1.0
    )


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("1", True), ("True", True), ("false", False), ("0", False)],
)
def test_overrides_bools(text, expected):
    config, _ = cfg.apply_overrides(_Cfg(), {"augment": text})
    assert config.augment is expected


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--lrr=1e-3"], r"^unknown option --lrr; did you mean 'lr'\?"),
        (["--config=tinyy"], r"^--config=tinyy: unknown; choose from tiny, small$"),
        (["--train_steps=abc"], r"^--train_steps=abc: expected int$"),
        (["--train_steps=1.5"], r"^--train_steps=1.5: expected int$"),
        (["--lr=fast"], r"^--lr=fast: expected float$"),
        (["--augment=maybe"], r"^--augment=maybe: expected bool$"),
        (["--width=1,x"], r"^--width=1,x: expected comma-separated ints$"),
        (["--dropout=lots"], r"^--dropout=lots: expected float or none$"),
        (["--solver=broyden"], r"^--solver=broyden: expected one of reversible, anderson$"),
        (["--lr"], r"^--lr needs a value"),
        (["lr=1"], r"^unexpected argument 'lr=1'"),
        # values of the right type that cannot work
        (["--lr=-1"], r"^--lr=-1.0: must be a positive learning rate"),
        (["--lr=inf"], r"^--lr=inf: must be a positive learning rate"),
        (["--train_steps=0"], r"^--train_steps=0: must be >= 1$"),
        (["--dropout=1.5"], r"^--dropout=1.5: must lie in \[0, 1\)"),
        (["--width=4,0"], r"^--width=4,0: must be one or more positive ints$"),
        (["--dim=18"], r"^--dim=18 is not divisible by --num_heads=4; .* --dim=16$"),
        (["--warmup_steps=200"], r"^--warmup_steps=200 exceeds --train_steps=100"),
        (["--solver=anderson"], r"^--adjoint=reversible needs --solver=reversible"),
        (["--data_dir=/no/such/dir"], r"^--data_dir=/no/such/dir: does not exist"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, pattern):
    with pytest.raises(cfg.ConfigError, match=pattern) as info:
        cfg.from_args(argv, _REGISTRY, "small")
    assert "\n" not in str(info.value)


def test_validate_checks_types_of_constructed_configs():
    with pytest.raises(cfg.ConfigError, match=r"^--train_steps='5' is not valid: expected int$"):
        cfg.validate(_Cfg(train_steps="5"))  # pyright: ignore[reportArgumentType]
    with pytest.raises(cfg.ConfigError, match=r"^--augment=1 is not valid: expected bool$"):
        cfg.validate(_Cfg(augment=1))  # pyright: ignore[reportArgumentType]
    cfg.validate(_Cfg(lr=1))  # an int is a float


def test_describe_lists_every_field():
    text = cfg.describe(_REGISTRY["tiny"])
    assert "--train_steps" in text and "= 10" in text and "--width" in text


def test_config_json_round_trip():
    config = _Cfg(width=(3, 4), dropout=0.25, solver="anderson", adjoint="implicit")
    d = json.loads(json.dumps(cfg.to_dict(config)))
    assert d["width"] == [3, 4]
    back = cfg.from_dict(_Cfg, d)
    assert back == config
    assert type(back.width) is tuple
    assert cfg.from_dict(_Cfg, {"train_steps": 5}) == _Cfg(train_steps=5)  # defaults
    with pytest.raises(cfg.ConfigError, match=r"unknown config field 'stepz'"):
        cfg.from_dict(_Cfg, {"stepz": 5})
    with pytest.raises(cfg.ConfigError, match=r"--train_steps='5' is not valid"):
        cfg.validate(cfg.from_dict(_Cfg, {"train_steps": "5"}))


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
    header = {"config": {"lr": 1e-3, "width": [1, 2]}, "step": 3}
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
    assert loaded_header == read_header(path)
    assert {k: v for k, v in loaded_header.items() if k not in ("xxh3_128", "bytes")} == header
    assert len(loaded_header["xxh3_128"]) == 32 and loaded_header["bytes"] > 0
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
    train_state = TrainState(model, (), jnp.asarray(5), state)
    save_checkpoint(tmp_path / "bn.eqx", train_state, {"step": 5})

    _, fresh_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, axis_name="batch", mode="ema")
    like = TrainState(model, (), jnp.asarray(0), fresh_state)
    assert not _leaves_equal(like, train_state)  # the running statistics moved
    loaded, _ = load_checkpoint(tmp_path / "bn.eqx", like)
    assert _leaves_equal(loaded, train_state)
    assert int(loaded.step) == 5


def test_checkpoint_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.eqx"
    save_checkpoint(path, {"w": jnp.arange(4.0)}, {"step": 1})
    original = path.read_bytes()

    def _boom(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", _boom)  # the temp file is written, then this fails
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(path, {"w": jnp.zeros(4)}, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.eqx"]

    with pytest.raises(TypeError, match="JSON serializable"):
        save_checkpoint(tmp_path / "other.eqx", {"w": jnp.zeros(4)}, {"bad": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.eqx"]


def test_checkpoint_mismatched_skeleton(tmp_path):
    path = tmp_path / "ckpt.eqx"
    save_checkpoint(path, {"w": jnp.zeros(4)}, {"step": 1})
    with pytest.raises(MismatchedCheckpoint, match=r"ckpt.eqx does not fit this model") as info:
        load_checkpoint(path, {"w": jnp.zeros(5)})
    assert "\n" not in str(info.value)
    with pytest.raises(MismatchedCheckpoint, match="it holds more arrays"):
        load_checkpoint(path, {})
    (tmp_path / "junk.eqx").write_bytes(b"\x93NUMPY not a header\n")
    with pytest.raises(DamagedCheckpoint, match="not a checkpoint header"):
        read_header(tmp_path / "junk.eqx")


def _damage(path: pathlib.Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    body = data.index(b"\n") + 1
    if how == "truncate":
        del data[len(data) // 2 :]
    elif how == "zero-fill":
        middle = body + (len(data) - body) // 2
        data[middle : middle + 4096] = bytes(len(data[middle : middle + 4096]))
    elif how == "bit-flip":
        data[body + (len(data) - body) // 3] ^= 0x10
    elif how == "header":
        data[5] ^= 0xFF
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


DAMAGES = ["truncate", "zero-fill", "bit-flip", "header", "empty"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_checkpoint_is_detected(tmp_path, how):
    model, opt_state = _mlp_and_adamw(jr.key(0))
    tree = {"model": model, "opt_state": opt_state, "big": jnp.ones((64, 64))}  # > 8 KiB
    path = tmp_path / "ckpt.eqx"
    save_checkpoint(path, tree, {"step": 1})
    _damage(path, how)
    with pytest.raises(DamagedCheckpoint, match=r"ckpt.eqx is damaged: ") as info:
        load_checkpoint(path, tree)
    assert "\n" not in str(info.value)


# ======================================================================================
# run directories
# ======================================================================================


def _state(value: float, step: int) -> TrainState:
    return TrainState({"w": jnp.full(3, float(value))}, (), jnp.asarray(step, jnp.int32))


def test_run_directory_is_one_run(tmp_path):
    run = Run(tmp_path / "run")
    run.check(resume=False, overwrite=False)  # absent: fine
    fresh = _state(0, 0)
    assert run.restore(fresh) == (fresh, {}) and not run.dir.exists()  # nothing to restore
    run.begin({"experiment": "x", "config": {"a": 1}}, step=0)
    assert json.loads((run.dir / "config.json").read_text())["config"] == {"a": 1}
    run.log(1, "train", loss=0.5)
    run.save(_state(1, 1))
    run.save(_state(2, 2), best=True, best_val=0.1)
    run.save(_state(3, 3))
    assert read_header(run.latest)["step"] == 3 and read_header(run.best)["step"] == 2
    assert read_header(run.best)["best_val"] == 0.1 and read_header(run.best)["experiment"] == "x"

    again = Run(run.dir)
    with pytest.raises(RunError, match=r"already holds a run; continue it with --resume"):
        again.check(resume=False, overwrite=False)
    with pytest.raises(RunError, match="give one"):
        again.check(resume=True, overwrite=True)
    again.check(resume=True, overwrite=False)
    state, header = again.restore(_state(0, 0))
    assert int(state.step) == 3 and header["step"] == 3
    with pytest.raises(RunError, match=r"latest.eqx does not fit this model.*--overwrite"):
        Run(run.dir).restore({"w": jnp.zeros(4)})

    again.check(resume=False, overwrite=True)
    (run.dir / ".latest.eqx.abc.tmp").write_bytes(b"x" * 100)
    again.begin({"experiment": "x", "config": {"a": 2}}, step=0, overwrite=True)
    assert sorted(p.name for p in run.dir.iterdir()) == ["config.json"]  # cleared


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_latest_falls_back_to_best(tmp_path, capsys, how):
    run = Run(tmp_path)
    run.begin({"config": {}}, step=0)
    run.save(_state(2, 2), best=True)
    run.save(_state(4, 4))
    _damage(run.latest, how)
    state, header = Run(tmp_path).restore(_state(0, 0))
    assert int(state.step) == 2 and _leaves_equal(state, _state(2, 2))
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {run.latest} is damaged") and err.count("\n") == 1
    assert f"falling back to {run.best}" in err

    _damage(run.best, how)
    with pytest.raises(
        RunError,
        match=r"best.eqx is damaged: .*\(latest.eqx is damaged too\); no intact checkpoint "
        r"to resume from; start over with --overwrite$",
    ) as info:
        Run(tmp_path).restore(_state(0, 0))
    assert "\n" not in str(info.value)
    run.best.unlink()
    with pytest.raises(RunError, match=r"latest.eqx is damaged: .*; no intact checkpoint"):
        Run(tmp_path).restore(_state(0, 0))


def test_run_refuses_non_finite_states_and_losses(tmp_path):
    run = Run(tmp_path)
    run.begin({"config": {}}, step=0)
    run.save(_state(1.0, 5))
    with pytest.raises(NonFiniteError, match=r"non-finite parameters at step 7.*keeps step 5"):
        run.save(_state(float("nan"), 7))
    assert read_header(run.latest)["step"] == 5
    good, _ = Run(tmp_path).restore(_state(0, 0))
    assert _leaves_equal(good, _state(1.0, 5))
    with pytest.raises(NonFiniteError, match=r"train loss is nan at step 8 .*keeps step 5"):
        run.log(8, "train", loss=float("nan"))
    assert read_metrics(tmp_path)[-1]["step"] == 8  # logged, then stopped


def test_resume_drops_metrics_after_the_checkpoint_and_torn_lines(tmp_path, capsys):
    run = Run(tmp_path)
    run.begin({"config": {}}, step=0)
    for step in (2, 4, 6):
        run.log(step, "train", loss=1.0 / step)
    with open(run.metrics.path, "a") as f:
        f.write('{"step": 8, "spl')  # a line cut short by a kill
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6]
    assert "skipped the torn last line" in capsys.readouterr().err
    Run(tmp_path).begin({"config": {}}, step=4)  # resumed from a checkpoint at step 4
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]
    assert run.metrics.path.read_bytes().endswith(b"\n")
    Run(tmp_path).log(6, "train", loss=0.1)
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6]


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
    schedule = warmup_cosine(1.0, warmup_steps=4, train_steps=12)
    values = [float(schedule(i)) for i in (0, 2, 4, 8, 12, 20)]
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], rtol=1e-6, atol=1e-7)
    linear = warmup_cosine(1.0, warmup_steps=12, train_steps=12)
    np.testing.assert_allclose([float(linear(i)) for i in (0, 6, 12)], [0.0, 0.5, 1.0])


@dataclasses.dataclass(frozen=True)
class _OptCfg:
    lr: float = 0.5
    weight_decay: float = 0.1
    grad_clip: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    train_steps: int = 10
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    plateau_window: int = 1
    min_lr: float = 0.01


def test_optimizer_decays_matrices_only_and_clips():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    optimizer, lr_at = make_optimizer(_OptCfg())
    updates, _ = optimizer.update(zero, optimizer.init(params), params, value=1.0)
    np.testing.assert_allclose(updates["w"], -0.5 * 0.1 * np.ones((2, 2)), rtol=1e-6)
    assert np.array_equal(updates["b"], np.zeros(2))
    assert float(lr_at(None, 3)) == 0.5

    big = {"w": jnp.full((2, 2), 1e3), "b": jnp.full(2, 1e3)}
    clipped, _ = make_optimizer(_OptCfg(weight_decay=0.0, grad_clip=1.0))
    free, _ = make_optimizer(_OptCfg(weight_decay=0.0))
    state_c, state_f = clipped.init(params), free.init(params)
    _, state_c = clipped.update(big, state_c, params, value=1.0)
    _, state_f = free.update(big, state_f, params, value=1.0)
    mu_c = [x for x in jax.tree.leaves(state_c) if x.shape == (2, 2)][0]
    mu_f = [x for x in jax.tree.leaves(state_f) if x.shape == (2, 2)][0]
    # first moment = (1 - b1) * g: clipping scales g (global norm sqrt(6) * 1e3) down to 1
    np.testing.assert_allclose(mu_f, 0.1 * 1e3 * np.ones((2, 2)), rtol=1e-5)
    np.testing.assert_allclose(mu_c, 0.1 * np.ones((2, 2)) / np.sqrt(6.0), rtol=1e-5)


def test_optimizer_schedules():
    cosine, lr_at = make_optimizer(_OptCfg(schedule="cosine", warmup_steps=2))
    np.testing.assert_allclose([float(lr_at(None, s)) for s in (0, 1, 2, 10)], [0, 0.25, 0.5, 0])
    plateau, lr_at = make_optimizer(_OptCfg(schedule="plateau"))
    params = {"w": jnp.ones((2, 2))}
    state = plateau.init(params)
    assert float(lr_at(state, 0)) == 0.5
    for _ in range(4):  # the loss never improves: the lr halves, down to min_lr
        _, state = plateau.update(params, state, params, value=1.0)
    assert 0.01 <= float(lr_at(state, 4)) < 0.5


def test_count_params():
    class _WithInts(eqx.Module):
        linear: eqx.nn.Linear
        table: jax.Array
        name: str = "x"

    model = _WithInts(eqx.nn.Linear(3, 4, key=jr.key(0)), jnp.arange(10))
    assert count_params(model) == 3 * 4 + 4  # the int table and the string are not parameters


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
    from experiments.common.optim import TrainState
    from experiments.common.run import Run
    from experiments.common.sharding import make_mesh, replicate, shard_batch

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
        updates, opt_state = optimizer.update(grads, state.opt_state)
        model = eqx.apply_updates(state.model, updates)
        return TrainState(model, opt_state, state.step + 1), {"loss": loss}

    def get_batch(step):
        x = np.random.default_rng(step).normal(size=(8, 3)).astype(np.float32)
        return shard_batch((x, x.sum(axis=1, keepdims=True)), mesh)

    def fresh():
        model = eqx.nn.Linear(3, 1, key=jr.key(0))
        return replicate(TrainState.create(model, optimizer), mesh)

    def run(workdir, total, resume):
        run = Run(workdir)
        state = fresh()
        if resume:
            state, _ = run.restore(state)
        run.begin({"config": {}}, step=int(state.step))
        for step in range(int(state.step), total):
            state, _ = train_step(state, get_batch(step), jr.fold_in(jr.key(0), step))
            if (step + 1) % 2 == 0:
                run.save(state)
        return state

    full = run(tmp / "full", 4, False)
    assert len(full.model.weight.sharding.device_set) == 4
    run(tmp / "split", 2, False)
    loaded, _ = Run(tmp / "split").restore(fresh())
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
