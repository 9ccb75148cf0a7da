"""Sharded train steps of both experiments on 4 (forced) host devices.

JAX fixes its device count when it is first imported, so each check runs
`sharding_worker.py` in a fresh process with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` and parses the JSON line it prints.
The worker runs one train step of the experiment's `tiny` config (batch 8) on one device
without a mesh, then the same step (same state, batch and key) through `DataParallel`, as
the training scripts do, on the 4-device mesh.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest

from experiments.common.sharding import DataParallel, fsdp_spec, ShardingError


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")


def _env(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        # Not `--xla_backend_optimization_level=0` (it halved compile time): with it, the
        # vision step's backward re-evaluation of the conv block differed from the forward
        # by more than the exact state's tolerance, and the reconstruction check raised.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "src")]),
    }


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _run_worker(*args: str) -> dict:
    env = _env(4)
    result = subprocess.run(
        [sys.executable, str(WORKER), *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return _last_json(result.stdout)


def _check_mode(result: dict, mode: str) -> dict:
    r = result[mode]
    # Same loss and the same update as on one device.
    assert r["loss_rel_error"] <= 1e-5, r
    assert r["grad_rel_error"] <= 1e-5, r
    assert r["param_max_rel_error"] <= 1e-5, r
    # Entries with a round-off gradient: at most one Adam step (lr) apart either way.
    assert r["noise_entries"] <= 1e-2 * r["param_entries"], r
    assert r["noise_max_abs_error"] <= 2.01 * r["lr"], r
    # The batch really is split: 4 shards of 8 / 4 rows on 4 devices, dtypes unchanged.
    assert r["batch"]["devices"] == 4, r
    assert [s[0] for s in r["batch"]["shards"]] == [2, 2, 2, 2], r
    assert r["batch"]["dtypes_kept"] and r["dtypes_kept"], r
    # The new state keeps the placed shardings, so step 2 (and a step after the loop swaps
    # in a fresh step counter) runs without recompiling.
    assert r["shardings_kept"], r
    assert r["recompiles_after_step_1"] == 0, r
    assert r["step"] == 3, r
    assert r["info"] == {
        "mode": mode,
        "num_devices": 4,
        "num_processes": 1,
        "platform": "cpu",
        "global_batch": 8,
        "per_device_batch": 2,
    }, r
    return r


def test_language_data_parallel_and_fsdp_match_one_device():
    result = _run_worker("language", "data,fsdp")
    assert _check_mode(result, "data")["sharded_param_leaves"] == 0  # all replicated
    fsdp = _check_mode(result, "fsdp")
    # FSDP splits the large leaves (the 50304 x 32 embedding and head, ...) 4 ways.
    assert fsdp["sharded_param_leaves"] >= 2, fsdp
    leaf = fsdp["example_sharded_leaf"]
    assert leaf["shape"] == [50304, 32] and leaf["shard"] == [50304 // 4, 32], leaf


def test_vision_data_parallel_matches_one_device():
    _check_mode(_run_worker("vision", "data"), "data")


def test_reversible_solves_under_shard_map():
    """Per-example exact solves that stop apart, `vmap`ped inside `jax.shard_map` (2 examples
    on each of 4 devices) and differentiated through it, with both `vmap_backward` rules:
    the same steps and gradients as on one device, and each device's compiled temporaries
    those of one device solving its 2 examples. A parameter the devices share must be
    marked per-device (`pcast`): else the backward pass's loop would sum its cotangent
    over devices that stop after different numbers of steps (they deadlocked, before the
    check), and the message says so. Without varying-axis types (`check_vma=False`) no
    marking is needed."""
    result = _run_worker("shard_map")
    for rule in ("per_example", "batch"):
        r = result[rule]
        assert r["num_steps"] == r["ref_num_steps"] and len(set(r["num_steps"])) >= 5, r
        assert r["x_shards"] == [[2, 16]] * 4, r
        # The shared parameter's cotangent is summed over devices in another order:
        # measured 6.5e-8 (per_example) and 2.6e-7 (batch); the input's: 0.
        assert r["grad_w_rel_error"] <= 1e-6 and r["grad_x_rel_error"] <= 1e-6, r
        assert r["no_vma_grad_w_rel_error"] <= 1e-6 and r["no_vma_grad_x_rel_error"] <= 1e-6, r
        assert "deadlock" in r["refused"] and "jax.lax.pcast(params, 'data'" in r["refused"]
        # Measured 1.00 (per_example) and 1.09 (batch: the loop carries the summed cotangent).
        assert r["temp_mib"] <= 1.15 * r["alone_temp_mib"], r


def test_indivisible_batch_fails_at_startup(tmp_path):
    """Batch 6 over 4 devices: a `ValueError` naming both numbers and the fix, raised by
    both training scripts before they load data (their data dirs do not exist)."""
    result = _run_worker("errors", str(tmp_path))
    assert result["devices"] == 4
    for case in ("helper", "language", "vision", "place_batch"):
        message = result[case]
        assert message is not None, f"{case}: no error"
        assert "batch size 6" in message and "number of devices 4" in message, message
        assert "multiple of 4" in message, message
    assert "--batch_size" in result["language"] and "--batch_size" in result["vision"]
    assert "int64" in result["int64"] and "int32" in result["int64"]
    assert "zero3" in result["mode"] and "fsdp" in result["mode"]
    assert not (tmp_path / "lm").exists() and not (tmp_path / "cifar").exists()


def test_two_processes_train_loop(tmp_path):
    """Multi-controller JAX on one machine: 2 processes x 2 CPU devices (gloo collectives),
    `jax.distributed.initialize` through `initialize_distributed`, batches assembled with
    `make_array_from_process_local_data`, a training loop with `Run` checkpoints, in both modes."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    # Output to files: a process blocked on a full pipe would stall the other at the
    # distributed shutdown barrier.
    logs = [(tmp_path / f"out{pid}.txt", tmp_path / f"err{pid}.txt") for pid in (0, 1)]
    procs = []
    for pid, (out, err) in enumerate(logs):
        with out.open("w") as stdout, err.open("w") as stderr:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "multihost", str(pid), port, str(tmp_path)],
                    env=_env(2),
                    cwd=REPO_ROOT,
                    stdout=stdout,
                    stderr=stderr,
                )
            )
    try:
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = []
    for proc, (out, err) in zip(procs, logs):
        assert proc.returncode == 0, err.read_text()[-4000:]
        outputs.append(_last_json(out.read_text()))
    first, second = outputs
    for out in outputs:
        assert (out["processes"], out["devices"], out["local_devices"]) == (2, 4, 2), out
    for mode, spec in (("data", "P()"), ("fsdp", "P(None, 'data')")):
        a, b = first[mode], second[mode]
        # Each process holds its own half of the global batch of 8.
        assert a["local_rows"] == [[0, 2], [2, 4]] and b["local_rows"] == [[4, 6], [6, 8]]
        assert a["weight_spec"] == a["final_spec"] == spec, a
        # Same checkpoint on both hosts (FSDP: gathered), equal to the one-device run.
        assert a["saved_sha256"] == b["saved_sha256"]
        assert a["max_abs_error"] <= 1e-5 * a["weight_scale"], a


# ----------------------------------------------------------------------------------------
# In-process (one device)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, expected",
    [
        ((50304, 32), "float32", ("data", None)),  # largest divisible axis
        ((32, 128), "float32", (None, "data")),
        ((96, 96), "float32", ("data", None)),  # tie: the first axis
        ((30, 34), "float32", ()),  # no axis divisible by 4
        ((16,), "float32", ()),  # small: stays replicated
        ((4096,), "int32", ()),  # not floating point
    ],
)
def test_fsdp_spec(shape, dtype, expected):
    spec = fsdp_spec(shape, dtype, 4, min_size=1024)
    assert tuple(spec) == expected


def test_one_device_is_a_no_op():
    if jax.device_count() != 1:
        pytest.skip("needs exactly one device")
    parallel = DataParallel(3, "fsdp")  # any batch size divides one device
    assert parallel.mesh is None and parallel.per_device_batch == 3
    state = {"w": jax.numpy.ones((4096, 8))}
    assert parallel.place_state(state) is state

    def step(s, b, k):
        return s, {}

    assert parallel.wrap_step(step) is step
    assert "devices: 1 x" in parallel.describe() and "sharding: fsdp" in parallel.describe()
    with pytest.raises(ShardingError, match="unknown sharding mode 'zero'"):
        DataParallel(8, "zero")
