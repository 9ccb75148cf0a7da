"""Worker for `test_sharding.py`: run in a fresh process with 4 host devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/experiments/sharding_worker.py \
        language data,fsdp

For one experiment's `tiny` config (batch 8): one train step on one device without a mesh,
then, for each sharding mode, one step of the same state, batch and key on the 4-device mesh
(through `DataParallel`, as the training scripts do), and two more steps to count
recompilations. `errors` instead checks the start-up errors, `shard_map` per-example
reversible solves inside `jax.shard_map`, and `multihost PROCESS_ID PORT TMP` (2 devices
per process, two processes) runs a checkpointed training loop across two JAX processes
with a checkpointed loop. Prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import functools as ft
import hashlib
import json
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from experiments.common.sharding import DataParallel, ShardingError


BATCH = 8
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _count_compile(event: str, *args: Any, **kwargs: Any) -> None:
    if event == BACKEND_COMPILE_EVENT:
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def _language():
    from experiments.language import train
    from experiments.language.configs import CONFIGS

    # warmup_steps=0: the first step has the peak learning rate, not 0; dropout stays on.
    config = dataclasses.replace(CONFIGS["tiny"], batch_size=BATCH, warmup_steps=0)

    def build(mode: str):
        config_ = dataclasses.replace(config, sharding=mode)
        return train.init_state(config_), train.make_train_step(config_)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, (BATCH, config.seq_len + 1)).astype(np.int32)
    return build, (tokens[:, :-1], tokens[:, 1:]), config.lr


def _vision():
    from experiments.vision import train
    from experiments.vision.configs import CONFIGS

    # augment=True: the random crop/flip key must give the same images when sharded.
    # The exact state: reversal rebuilds each device's forward pass to the bit, so the
    # only difference from one device is the reduction order of the forward pass. (With a
    # float32 state at beta = 0.8 the reconstruction error, different on each layout, made
    # the gradients differ by 2e-3; the z0 = 0 ReLU kink of the conv block then matters too.)
    config = dataclasses.replace(CONFIGS["tiny"], batch_size=BATCH, state_dtype="exact")

    def build(mode: str):
        config_ = dataclasses.replace(config, sharding=mode)
        return train.init_state(config_), train.make_train_step(config_)

    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
        "label": (np.arange(BATCH) % 10).astype(np.int32),
    }
    return build, batch, config.lr


def _inexact(tree) -> list[jax.Array]:
    return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))


def _first_moment(state) -> list[np.ndarray]:
    """Adam's `mu` after one step: (1 - b1) x the (clipped) gradient, leaf by leaf."""
    found = [
        s
        for s in jax.tree.leaves(
            state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(found) == 1, found
    return [np.asarray(x, np.float64) for x in _inexact(found[0].mu)]


def _compare(new, ref, lr: float) -> dict[str, Any]:
    """Gradient and updated-parameter errors of `new` against the single-device `ref`.

    `grad_rel_error`: ||g_new - g_ref|| / ||g_ref|| over all leaves (g from Adam's `mu`).
    `param_max_rel_error`: max over leaves of max|p_new - p_ref| / max|p_ref|, over every
    entry whose gradient is exactly 0 in both runs or above float32 round-off
    (|g| > 1e-6 max|g|). In between, Adam's g / (|g| + eps) turns round-off into an update
    of up to lr of either sign (e.g. the attention key bias, whose true gradient is 0);
    those entries are reported separately (`noise_entries`, `noise_max_abs_error`, at most
    2 lr by construction).
    """
    g_new, g_ref = _first_moment(new), _first_moment(ref)
    flat_new, flat_ref = (np.concatenate([g.ravel() for g in gs]) for gs in (g_new, g_ref))
    threshold = 1e-6 * float(np.max(np.abs(flat_ref)))
    p_new = [np.asarray(x, np.float64) for x in _inexact(new.model)]
    p_ref = [np.asarray(x, np.float64) for x in _inexact(ref.model)]
    assert len(p_new) == len(p_ref) == len(g_ref) > 0
    worst, noise_entries, noise_error = 0.0, 0, 0.0
    for a, b, g, h in zip(p_new, p_ref, g_ref, g_new):
        assert a.shape == b.shape == g.shape == h.shape
        signal = (np.abs(g) > threshold) | ((g == 0) & (h == 0))
        if signal.any():
            worst = max(worst, float(np.max(np.abs(a - b)[signal]) / np.max(np.abs(b))))
        if (~signal).any():
            noise_entries += int(np.sum(~signal))
            noise_error = max(noise_error, float(np.max(np.abs(a - b)[~signal])))
    return {
        "grad_rel_error": float(np.linalg.norm(flat_new - flat_ref) / np.linalg.norm(flat_ref)),
        "param_max_rel_error": worst,
        "noise_entries": noise_entries,
        "param_entries": int(sum(b.size for b in p_ref)),
        "noise_max_abs_error": noise_error,
        "lr": lr,
    }


def _shards(x: jax.Array) -> list[list[int]]:
    return [list(s.data.shape) for s in x.addressable_shards]


def run_experiment(name: str, modes: list[str]) -> dict:
    build, batch_np, lr = {"language": _language, "vision": _vision}[name]()
    key = jr.key(1)
    t0 = time.perf_counter()
    state, step = build("data")
    ref_state, ref_metrics = step(state, jax.device_put(batch_np), key)  # one device, no mesh
    ref_loss = float(ref_metrics["loss"])
    out: dict[str, Any] = {"single_loss": ref_loss, "single_seconds": time.perf_counter() - t0}
    for mode in modes:
        t0 = time.perf_counter()
        state, step = build(mode)
        parallel = DataParallel(BATCH, mode)
        state = parallel.place_state(state)
        placed = parallel.shardings
        sharded_step = parallel.wrap_step(step)
        batch = parallel.place_batch(batch_np)
        new_state, metrics = sharded_step(state, batch, key)
        loss = float(metrics["loss"])

        # Batch: 4 shards of BATCH/4 rows on 4 different devices, dtypes unchanged.
        first = jax.tree.leaves(batch)[0]
        batch_info = {
            "shards": _shards(first),
            "devices": len({s.device for s in first.addressable_shards}),
            "dtypes_kept": all(
                np.dtype(x.dtype) == np.dtype(y.dtype)
                for x, y in zip(jax.tree.leaves(batch), jax.tree.leaves(batch_np))
            ),
        }
        # State: every array of the new state has the sharding it was placed with.
        new_arrays = jax.tree.leaves(eqx.filter(new_state, eqx.is_array))
        specs = jax.tree.leaves(placed, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        specs = [s for s in specs if isinstance(s, jax.sharding.Sharding)]
        assert len(specs) == len(new_arrays), (len(specs), len(new_arrays))
        kept = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(new_arrays, specs))
        sharded_leaves = [
            {"shape": list(x.shape), "shard": list(x.addressable_shards[0].data.shape)}
            for x in _inexact(new_state.model)
            if not x.sharding.is_fully_replicated and x.addressable_shards[0].data.shape != x.shape
        ]
        dtypes_kept = all(
            x.dtype == y.dtype for x, y in zip(_inexact(new_state), _inexact(ref_state))
        )

        # Recompilation: step 2 on step 1's output, step 3 after the step counter is
        # replaced by a fresh uncommitted array (as the loop does at checkpoints).
        before = _compiles[0]
        state2, _ = sharded_step(new_state, batch, jr.key(2))
        state2 = eqx.tree_at(lambda s: s.step, state2, jnp.asarray(2, jnp.int32))
        state3, metrics3 = sharded_step(state2, batch, jr.key(3))
        jax.block_until_ready(metrics3["loss"])
        out[mode] = {
            "loss": loss,
            "loss_rel_error": abs(loss - ref_loss) / abs(ref_loss),
            **_compare(new_state, ref_state, lr),
            "batch": batch_info,
            "shardings_kept": kept,
            "dtypes_kept": dtypes_kept,
            "sharded_param_leaves": len(sharded_leaves),
            "param_leaves": len(_inexact(new_state.model)),
            "example_sharded_leaf": sharded_leaves[0] if sharded_leaves else None,
            "recompiles_after_step_1": _compiles[0] - before,
            "step": int(state3.step),
            "info": parallel.info(),
            "seconds": time.perf_counter() - t0,
        }
    return out


def run_errors(tmp: str) -> dict:
    """Every message, keyed by case; `None` where nothing was raised."""

    def message(fn) -> str | None:
        try:
            fn()
        except ShardingError as e:
            return str(e)
        return None

    from experiments.language import train as ltrain
    from experiments.language.configs import CONFIGS as LCONFIGS
    from experiments.vision import train as vtrain
    from experiments.vision.configs import CONFIGS as VCONFIGS

    nowhere = f"{tmp}/nowhere"  # data loading would fail: the check must come first
    lconfig = dataclasses.replace(LCONFIGS["tiny"], batch_size=6, data_dir=nowhere)
    vconfig = dataclasses.replace(VCONFIGS["tiny"], batch_size=6, data_dir=nowhere, download=False)
    parallel = DataParallel(8)
    return {
        "devices": jax.device_count(),
        "helper": message(lambda: DataParallel(6)),
        "language": message(lambda: ltrain.train(lconfig, f"{tmp}/lm")),
        "vision": message(lambda: vtrain.train(vconfig, f"{tmp}/cifar")),
        "place_batch": message(lambda: parallel.place_batch(np.zeros((6, 3), np.float32))),
        "int64": message(lambda: parallel.place_batch(np.zeros((8, 3), np.int64))),
        "mode": message(lambda: DataParallel(8, "zero3")),
    }


def run_multihost(tmp: str) -> dict:
    """One of two processes (2 CPU devices each): a checkpointed training loop on a small
    linear model with `DataParallel` over all 4 devices, in both modes, against the same
    loop on one device."""

    from experiments.common.checkpoint import load_checkpoint
    from experiments.common.optim import TrainState
    from experiments.common.run import Run

    optimizer = optax.adam(1e-2)

    @eqx.filter_jit
    def step(state, batch, key):
        x, y = batch
        x = x + 0.01 * jr.normal(key, x.shape)  # the per-step key, replicated

        def loss_fn(model):
            return jnp.mean((jax.vmap(model)(x) - y) ** 2)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(state.model)
        updates, opt_state = optimizer.update(grads, state.opt_state)
        model = eqx.apply_updates(state.model, updates)
        return TrainState(model, opt_state, state.step + 1), {"loss": loss}

    def global_batch(s: int):  # the same on every host, from (seed, step)
        x = np.random.default_rng(s).normal(size=(BATCH, 64)).astype(np.float32)
        return x, x[:, :4] @ np.arange(4 * 32, dtype=np.float32).reshape(4, 32) / 100

    def fresh():
        return TrainState.create(eqx.nn.Linear(64, 32, key=jr.key(0)), optimizer)

    def run(workdir, get_batch, state, train_step):
        run = Run(workdir)
        run.begin({"config": {}}, step=0)
        for step in range(4):
            state, metrics = train_step(state, get_batch(step), jr.fold_in(jr.key(0), step))
            run.log(step + 1, "train", loss=float(metrics["loss"]))
            if (step + 1) % 2 == 0:
                run.save(state)
        return state

    pid = jax.process_index()
    out: dict[str, Any] = {"process": pid, "processes": jax.process_count()}
    out["devices"], out["local_devices"] = jax.device_count(), jax.local_device_count()
    reference = None
    if pid == 0:  # one device, no mesh (process-local arrays only)
        ref = run(f"{tmp}/ref", lambda s: jax.device_put(global_batch(s)), fresh(), step)
        reference = np.asarray(ref.model.weight)
    for mode in ("data", "fsdp"):
        parallel = DataParallel(BATCH, mode, min_size=1)  # min_size=1: shard the Linear
        state = parallel.place_state(fresh())
        spec = str(state.model.weight.sharding.spec)
        batch = parallel.place_batch(global_batch(0))
        rows = sorted(list(s.index[0].indices(BATCH)[:2]) for s in batch[0].addressable_shards)
        workdir = f"{tmp}/{mode}/process{pid}"
        final = run(
            workdir,
            lambda s: parallel.place_batch(global_batch(s)),
            state,
            parallel.wrap_step(step),
        )
        saved, _ = load_checkpoint(f"{workdir}/latest.eqx", fresh())
        out[mode] = {
            "weight_spec": spec,
            "final_spec": str(final.model.weight.sharding.spec),
            "local_rows": rows,
            "saved_sha256": hashlib.sha256(np.asarray(saved.model.weight).tobytes()).hexdigest(),
        }
        if reference is not None:
            out[mode]["max_abs_error"] = float(
                np.max(np.abs(np.asarray(saved.model.weight) - reference))
            )
            out[mode]["weight_scale"] = float(np.max(np.abs(reference)))
    return out


def run_shard_map() -> dict:
    """Per-example exact solves that stop apart, `vmap`ped inside `jax.shard_map` over the 4
    devices (2 examples each), differentiated through the `shard_map`: the in-place loop's
    `vmap` rule and the reversible backward pass under a manual-sharding transform, with
    each `vmap_backward` rule. Compared with the same loss on one device."""
    from jax.sharding import PartitionSpec as P

    import revdeq_jax as rdeq

    width = 16
    kw, kx = jr.split(jr.key(0))
    w = 0.9 * jr.normal(kw, (width, width)) / np.sqrt(width)
    # Larger inputs saturate the tanh, which then contracts faster: the examples stop apart.
    scales = jnp.array([0.05, 8.0, 0.3, 3.0, 1.0, 0.1, 2.0, 0.6])
    xs = scales[:, None] * jr.normal(kx, (BATCH, width))
    weights = jnp.cos(jnp.arange(BATCH * width, dtype=jnp.float32)).reshape(BATCH, width)
    mesh = jax.make_mesh((4,), ("data",))
    place = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    placed = (place(w, P()), place(xs, P("data")), place(weights, P("data")))
    out: dict[str, Any] = {}
    for rule in ("per_example", "batch"):
        adjoint = rdeq.ReversibleAdjoint(vmap_backward=rule)  # raises on a mismatch

        def partial_loss(w, xs, weights, adjoint=adjoint):
            def solve(x):
                sol = rdeq.fixed_point(
                    lambda z, x: jnp.tanh(w @ z + x), jnp.zeros_like(x), x,
                    solver=rdeq.Reversible(0.8, state_dtype="exact"), adjoint=adjoint,
                    max_steps=40, tol=1e-3,
                )  # fmt: skip
                return sol.value, sol.num_steps

            values, num_steps = jax.vmap(solve)(xs)
            return jnp.sum(jnp.sin(values) * weights), num_steps

        def sharded_loss(w, xs, weights, partial_loss=partial_loss, cast=True, vma=True):
            def local(w, xs, weights):
                if cast:  # per-device copies of the shared parameters
                    w = jax.lax.pcast(w, "data", to="varying")
                loss, num_steps = partial_loss(w, xs, weights)
                return jax.lax.psum(loss, "data"), num_steps

            return jax.shard_map(
                local, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                out_specs=(P(), P("data")), check_vma=vma,
            )(w, xs, weights)  # fmt: skip

        grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))
        sharded = grad(sharded_loss)
        (gw, gx), steps = sharded(*placed)
        (rw, rx), ref_steps = grad(partial_loss)(w, xs, weights)
        jax.effects_barrier()  # a mismatch raised in a callback surfaces here

        def rel(a, b):
            return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

        # Compiled temporaries per device against one device solving its 2 examples.
        mem = sharded.lower(*placed).compile().memory_analysis()
        alone = grad(partial_loss).lower(w, xs[:2], weights[:2]).compile().memory_analysis()
        # Without the per-device copies: refused with a message saying what to do.
        try:
            grad(ft.partial(sharded_loss, cast=False))(*placed)
            refused = None
        except ValueError as e:
            refused = str(e)
        # Without varying-axis types (`check_vma=False`) nothing needs marking.
        (uw, ux), _ = grad(ft.partial(sharded_loss, cast=False, vma=False))(*placed)
        jax.effects_barrier()
        out[rule] = {
            "refused": refused,
            "no_vma_grad_w_rel_error": rel(uw, rw),
            "no_vma_grad_x_rel_error": rel(ux, rx),
            "num_steps": np.asarray(steps).tolist(),
            "ref_num_steps": np.asarray(ref_steps).tolist(),
            "grad_w_rel_error": rel(gw, rw),
            "grad_x_rel_error": rel(gx, rx),
            "temp_mib": mem.temp_size_in_bytes / 2**20,
            "alone_temp_mib": alone.temp_size_in_bytes / 2**20,
            "x_shards": _shards(gx),
        }
    return out


def main(argv: list[str]) -> None:
    if argv[0] == "multihost":  # multihost PROCESS_ID PORT TMP
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from experiments.common.sharding import initialize_distributed

        rest = initialize_distributed(
            [
                "--coordinator_address",
                f"localhost:{argv[2]}",
                "--num_processes=2",
                f"--process_id={argv[1]}",
                "--other=1",
            ]
        )
        assert rest == ["--other=1"], rest
        print(json.dumps(run_multihost(argv[3])))
        return
    if jax.device_count() != 4:
        raise SystemExit(f"expected 4 devices, got {jax.devices()}; set XLA_FLAGS")
    if argv[0] == "errors":
        result = run_errors(argv[1])
    elif argv[0] == "shard_map":
        result = run_shard_map()
    else:
        result = run_experiment(argv[0], argv[1].split(","))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
