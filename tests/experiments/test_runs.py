"""Training runs you can trust, through the command lines of both experiments.

* every bad value is one `error: ...` line on stderr, exit status 2, before anything is
  loaded, and leaves an existing run directory exactly as it was;
* a run directory is one run: `--resume` uses its own `config.json`, also before the
  first checkpoint; a fresh start in a used directory refuses;
* a run killed at any point (before its first checkpoint, in the middle of a checkpoint
  write, anywhere) and resumed ends where the uninterrupted run ends, to the bit;
* damaged checkpoints fall back to `best.eqx` or stop with one line.

The end-to-end runs use the vision experiment's `tiny` config cut down to one scale, on
the CIFAR-10 sample, in subprocesses (`python -m experiments.vision.train ...`).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import numpy as np
import pytest

from experiments.common import config as cfg
from experiments.common.checkpoint import load_checkpoint
from experiments.language import train as ltrain
from experiments.language.configs import CONFIGS as LCONFIGS
from experiments.vision import data as vdata, train as vtrain
from experiments.vision.configs import Config as VisionConfig, CONFIGS as VCONFIGS


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HAS_SAMPLE = (vdata.default_sample_dir() / vdata.SAMPLE_TRAIN).is_file()
needs_sample = pytest.mark.skipif(not HAS_SAMPLE, reason="needs shared/data/cifar10-sample")


def _snapshot(directory: pathlib.Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture
def used_run(tmp_path) -> pathlib.Path:
    """A run directory holding some other run's files."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"experiment": "other", "config": {}}\n')
    (workdir / "latest.eqx").write_bytes(b"an old run's checkpoint")
    (workdir / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')
    return workdir


# ---------------------------------------------------------------------------------------------
# Bad values: one line, exit status 2, nothing changed


COMMON_BAD = [
    ("--lr=-1", "--lr=-1.0: must be a positive learning rate"),
    ("--lr=abc", "--lr=abc: expected float"),
    ("--lr=nan", "--lr=nan: must be a positive learning rate"),
    ("--batch_size=0", "--batch_size=0: must be >= 1"),
    ("--train_steps=0", "--train_steps=0: must be >= 1"),
    ("--train_steps=-5", "--train_steps=-5: must be >= 1"),
    ("--eval_every=0", "--eval_every=0: must be >= 1"),
    ("--log_every=0", "--log_every=0: must be >= 1"),
    ("--checkpoint_every=0", "--checkpoint_every=0: must be >= 1"),
    ("--warmup_steps=-1", "--warmup_steps=-1: must be >= 0"),
    ("--warmup_steps=100000000", "--warmup_steps=100000000 exceeds --train_steps="),
    ("--weight_decay=-0.1", "--weight_decay=-0.1: must be >= 0"),
    ("--grad_clip=-1", "--grad_clip=-1.0: must be >= 0"),
    ("--solver=foo", "--solver=foo: expected one of reversible, relaxed, picard, anderson"),
    ("--adjoint=magic", "--adjoint=magic: expected one of reversible, unrolled"),
    ("--solver=anderson", "--adjoint=reversible needs --solver=reversible"),
    ("--beta=1", "--beta=1.0: must lie in (0, 2) and not be 1"),
    ("--beta=2.5", "--beta=2.5: must lie in (0, 2) and not be 1"),
    ("--tol=-1", "--tol=-1.0: must be >= 0"),
    ("--state_dtype=float16", "--state_dtype=float16: expected one of auto, exact"),
    ("--implicit_max_steps=0", "--implicit_max_steps=0: must be >= 1"),
    ("--anderson_m=0", "--anderson_m=0: must be >= 1"),
    ("--holdout_fraction=1.5", "--holdout_fraction=1.5: must lie in (0, 1)"),
    ("--seed=-1", "--seed=-1: must be >= 0"),
    ("--sharding=zero3", "--sharding=zero3: expected one of data, fsdp"),
    ("--data-dir=/no/such/dir", "--data_dir=/no/such/dir: does not exist"),
    ("--lrr=1", "unknown option --lrr; did you mean 'lr'?"),
    ("--config=huge", "--config=huge: unknown; choose from"),
    ("--lr", "--lr needs a value"),
    ("lr=1", "unexpected argument 'lr=1'"),
    ("--resume=maybe", "--resume=maybe: expected true or false"),
]
LANGUAGE_BAD = [
    ("--seq_len=0", "--seq_len=0: must be >= 1"),
    ("--dim=30", "--dim=30 is not divisible by --num_heads=8; use a multiple of 8, e.g. --dim=24"),
    ("--num_heads=0", "--num_heads=0: must be >= 1"),
    ("--max_steps=0", "--max_steps=0: must be >= 1 (solver steps)"),
    ("--dropout=1.5", "--dropout=1.5: must lie in [0, 1)"),
    ("--dropout=1", "--dropout=1.0: must lie in [0, 1)"),
    ("--model=gpt", "--model=gpt: expected one of deq, explicit"),
    ("--splits=all", "--splits=all: expected one of standard, valid-as-train"),
    ("--param_dtype=int8", "--param_dtype=int8: expected one of float32, float64, bfloat16"),
    ("--eval_tokens=0", "--eval_tokens=0: must be >= 1, or none for all"),
    ("--tokenizer-dir=/no/such/dir", "--tokenizer_dir=/no/such/dir: does not exist"),
    ("--schedule=plateau", "--schedule=plateau: expected one of cosine, constant"),
]
VISION_BAD = [
    ("--max_steps=0,2", "--max_steps=0,2: must be >= 1 (solver steps)"),
    (
        "--max_steps=2",
        "--channels, --width and --max_steps need one entry per scale, got 2, 2 and 1",
    ),
    ("--channels=4,x", "--channels=4,x: expected comma-separated ints"),
    ("--width=0,1", "--width=0,1: must be one or more positive ints"),
    ("--bn_momentum=1", "--bn_momentum=1.0: must lie in [0, 1)"),
    ("--schedule=linear", "--schedule=linear: expected one of plateau, cosine, constant"),
    ("--plateau_factor=2", "--plateau_factor=2.0: must lie in (0, 1)"),
    ("--min_lr=1", "--min_lr=1.0 exceeds --lr=0.001; use a smaller --min_lr"),
    ("--model=vit", "--model=vit: expected one of implicit-resnet, single-scale"),
    ("--ode_solver=rk4", "--ode_solver=rk4: expected one of euler, heun, tsit5, dopri5"),
    ("--train_size=-1", "--train_size=-1: must be >= 0 (0: all)"),
    ("--augment=sometimes", "--augment=sometimes: expected bool"),
]
CASES = [("language", *c) for c in COMMON_BAD + LANGUAGE_BAD] + [
    ("vision", *c) for c in COMMON_BAD + VISION_BAD
]


@pytest.mark.parametrize("experiment, arg, message", CASES)
def test_bad_values_are_one_line_and_change_nothing(used_run, capsys, experiment, arg, message):
    main = {"language": ltrain.main, "vision": vtrain.main}[experiment]
    before = _snapshot(used_run)
    with pytest.raises(SystemExit) as exit_:
        main(["--config=tiny", f"--workdir={used_run}", "--overwrite", arg])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2
    assert err.startswith("error: " + message), err
    assert err.count("\n") == 1 and "Traceback" not in out + err
    assert _snapshot(used_run) == before


@pytest.mark.parametrize("main", [ltrain.main, vtrain.main], ids=["language", "vision"])
def test_used_workdir_refuses_a_fresh_start(used_run, capsys, main):
    before = _snapshot(used_run)
    for argv, message in [
        ([], "already holds a run; continue it with --resume, or start over with --overwrite"),
        (["--resume", "--overwrite"], "--resume continues a run and --overwrite deletes it"),
        (["--resume"], "holds a other run, not"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["--config=tiny", f"--workdir={used_run}", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert _snapshot(used_run) == before


@pytest.mark.parametrize(
    "main, name", [(ltrain.main, "wikitext"), (vtrain.main, "cifar")], ids=["language", "vision"]
)
def test_resume_takes_the_runs_config(tmp_path, capsys, main, name):
    """`--resume` reads the run's config.json (a bad one is refused before anything runs);
    `--config` must then name the run's config; overrides print the run's old value."""
    configs = {"wikitext": LCONFIGS, "cifar": VCONFIGS}[name]
    workdir = tmp_path / "run"
    workdir.mkdir()
    saved = cfg.to_dict(configs["tiny"]) | {"lr": -1.0}  # a value no CLI would have accepted
    (workdir / "config.json").write_text(
        json.dumps({"experiment": name, "name": "tiny", "config": saved})
    )
    before = _snapshot(workdir)
    with pytest.raises(SystemExit) as exit_:
        main([f"--workdir={workdir}", "--resume"])
    out, err = capsys.readouterr()
    assert (
        exit_.value.code == 2
        and err == "error: --lr=-1.0: must be a positive learning rate, e.g. 3e-4\n"
    )
    assert "resuming" in out and "with its config.json" in out
    with pytest.raises(SystemExit):
        main([f"--workdir={workdir}", "--resume", "--config=small", "--lr=1e-3"])
    assert "is a 'tiny' run; drop --config to resume it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"--workdir={workdir}", "--resume", "--lr=1e-3", "--batch_size=0"])
    err = capsys.readouterr().err
    assert err == "error: --batch_size=0: must be >= 1\n"  # the lr override fixed the lr
    assert _snapshot(workdir) == before


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        vtrain.main(["--config=tiny", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config=tiny" in out and "--train_steps" in out and "--max_steps" in out


# ---------------------------------------------------------------------------------------------
# Whole runs in subprocesses: kill, resume, compare

TINY = [
    "--config=tiny",
    "--channels=4",
    "--width=1",
    "--max_steps=2",
    "--train_steps=8",
    "--log_every=1",
    "--eval_every=4",
    "--checkpoint_every=2",
]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",  # compiles ~2x faster
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "src")]),
    }


def _train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "experiments.vision.train", *args],
        env=_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(workdir: pathlib.Path) -> list[dict]:
    """Metrics without the wall-clock fields."""
    clock = ("time", "ms_per_step", "images_per_s")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in clock} for line in lines]


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
    path.write_bytes(bytes(data))


def _assert_same_run(a: pathlib.Path, b: pathlib.Path) -> None:
    config = cfg.from_dict(VisionConfig, json.loads((a / "config.json").read_text())["config"])
    like = eqx.filter_eval_shape(vtrain.init_state, config)
    for name in ("latest.eqx", "best.eqx"):
        x, hx = load_checkpoint(a / name, like)
        y, hy = load_checkpoint(b / name, like)
        assert hx["step"] == hy["step"] and hx["xxh3_128"] == hy["xxh3_128"], name
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert _records(a) == _records(b)
    ra, rb = (json.loads((w / "results.json").read_text()) for w in (a, b))
    assert ra["test"] == rb["test"] and ra["val"] == rb["val"]
    assert not list(b.glob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    _train(*TINY, f"--workdir={workdir}")
    return workdir


def _kill_when(workdir: pathlib.Path, ready, delay: float = 0.0) -> int:
    """Start the tiny run, SIGKILL it once `ready(workdir)` holds (then `delay` seconds);
    returns the exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.vision.train", *TINY, f"--workdir={workdir}"],
        env=_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready(workdir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return proc.returncode


@needs_sample
@pytest.mark.slow
def test_uninterrupted_run(reference):
    assert json.loads((reference / "config.json").read_text())["name"] == "tiny"
    steps = [r["step"] for r in _records(reference) if r["split"] == "train"]
    assert steps == list(range(1, 9))
    assert (reference / "results.json").is_file() and (reference / "curves.png").is_file()


@needs_sample
@pytest.mark.slow
def test_killed_before_the_first_checkpoint_resumes_from_its_config(tmp_path, reference):
    workdir = tmp_path / "run"
    _kill_when(workdir, lambda w: (w / "config.json").is_file())
    assert not (workdir / "latest.eqx").exists()
    # No --config and no overrides: the run's config.json, never the default `small` config.
    result = _train(f"--workdir={workdir}", "--resume")
    assert "resuming" in result.stdout and "steps 0 -> 8" in result.stdout
    _assert_same_run(reference, workdir)


@needs_sample
@pytest.mark.slow
def test_killed_during_a_checkpoint_write_resumes_exactly(tmp_path, reference):
    """A write killed half-way (here: the process exits inside the third write of
    latest.eqx, at step 6, as SIGKILL would) leaves latest.eqx (step 4) intact and a temp
    file, which resume removes."""
    workdir = tmp_path / "run"
    crash = (
        "import os, runpy, sys\n"
        "import experiments.common.checkpoint as c\n"
        "calls, real = [0], c.atomic_write\n"
        "def dying(path, write):\n"
        "    calls[0] += str(path).endswith('latest.eqx')\n"
        "    if str(path).endswith('latest.eqx') and calls[0] == 3:\n"
        "        def half(f):\n"
        "            write(f); f.truncate(f.tell() // 2); f.flush(); os._exit(137)\n"
        "        return real(path, half)\n"
        "    return real(path, write)\n"
        "c.atomic_write = dying\n"
        "sys.argv = ['train', *sys.argv[1:]]\n"
        "runpy.run_module('experiments.vision.train', run_name='__main__')\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", crash, *TINY, f"--workdir={workdir}"],
        env=_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert len(list(workdir.glob(".latest.eqx.*.tmp"))) == 1
    result = _train(f"--workdir={workdir}", "--resume")
    assert "removed .latest.eqx." in result.stdout
    _assert_same_run(reference, workdir)


@needs_sample
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_at_a_random_point_resumes_exactly(tmp_path, reference, seed):
    workdir = tmp_path / "run"
    delay = random.Random(seed).uniform(0.0, 6.0)
    _kill_when(workdir, lambda w: (w / "config.json").is_file(), delay=delay)
    _train(f"--workdir={workdir}", "--resume")
    _assert_same_run(reference, workdir)


@needs_sample
@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "zero-fill", "bit-flip"])
def test_damaged_checkpoints_on_the_command_line(tmp_path, reference, how):
    workdir = tmp_path / "run"
    _train(*TINY, "--train_steps=6", f"--workdir={workdir}")  # then extended to 8
    best_step = json.loads((workdir / "best.eqx").read_bytes().split(b"\n")[0])["step"]
    _damage(workdir / "latest.eqx", how)
    result = _train(f"--workdir={workdir}", "--resume", "--train_steps=8")
    assert f"warning: {workdir / 'latest.eqx'} is damaged" in result.stderr
    assert f"falling back to {workdir / 'best.eqx'}" in result.stderr
    assert f"steps {best_step} -> 8" in result.stdout
    _assert_same_run(reference, workdir)

    # Both damaged: one line naming the file and what to do, exit status 1, nothing changed.
    _damage(workdir / "latest.eqx", how)
    _damage(workdir / "best.eqx", how)
    before = _snapshot(workdir)
    failed = _train(f"--workdir={workdir}", "--resume", check=False)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.count("\n") == 1 and "best.eqx is damaged" in failed.stderr
    assert "start over with --overwrite" in failed.stderr
    assert _snapshot(workdir) == before


@needs_sample
@pytest.mark.slow
def test_ctrl_c_saves_and_exits_with_one_line(tmp_path, reference):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.vision.train", *TINY, f"--workdir={workdir}"],
        env=_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (workdir / "metrics.jsonl").is_file():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.startswith("interrupted: saved step ") and err.count("\n") == 1, err
    assert "continue with --resume" in err
    _train(f"--workdir={workdir}", "--resume")
    _assert_same_run(reference, workdir)
