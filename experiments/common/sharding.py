"""Data parallelism (optionally FSDP) over all visible devices with `jax.sharding`.

The batch is split along its leading axis over a 1-D mesh with axis name `"data"`. The
training state is either replicated (`mode="data"`) or, with `mode="fsdp"`, every large
floating-point array of the model and optimiser state is split along its largest axis
that the device count divides. The whole train step is one `jit`: XLA's SPMD partitioner
inserts the gradient all-reduce (and, for FSDP, the parameter all-gathers and gradient
reduce-scatters). No `pmap`, no `shard_map`.

```python
parallel = DataParallel(batch_size=64, mode="data")  # checks 64 % devices == 0 now
state = parallel.place_state(state)                   # replicate / shard the state
train_step = parallel.wrap_step(train_step)           # keeps the state's shardings
batch = parallel.place_batch(get_batch(step))         # the global batch, split over "data"
state, metrics = train_step(state, batch, key)
```

On one device all of this is a no-op (nothing is given an explicit sharding: that would
only make the second step recompile), so the same script runs on a laptop.

Several hosts: call `initialize_distributed()` (or pass `--distributed` to the training
scripts) before anything else touches JAX. The mesh then spans `jax.devices()` of every
host, and `place_batch` builds each global batch with
`jax.make_array_from_process_local_data` from the rows owned by this host's devices.

The lower-level pieces (`make_mesh`, `shard_batch`, `replicate`, `fsdp_shardings`,
`place`, `constrain`) are public too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding


T = TypeVar("T")
DATA_AXIS = "data"
SHARDING_MODES = ("data", "fsdp")
FSDP_MIN_SIZE = 1024  # arrays with fewer elements stay replicated under FSDP


class ShardingError(ValueError):
    """A configuration that cannot be laid out on the devices (batch size, mode, dtype)."""


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh, axis `"data"`, over the first `num_devices` (default: all)."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(
            f"`num_devices` must be between 1 and the {len(devices)} visible "
            f"device(s), got {num_devices}"
        )
    return Mesh(np.asarray(devices[:num_devices]), axis_names=(DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `"data"`, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def _indivisible_message(batch_size: int, num_devices: int, option: str | None) -> str:
    low = max(num_devices, batch_size // num_devices * num_devices)
    change = f"set {option} to" if option else "use"
    return (
        f"batch size {batch_size} is not divisible by the number of devices {num_devices} "
        f"(every device gets the same share of the global batch); {change} a multiple of "
        f"{num_devices} (e.g. {low} or {low + num_devices}), or make fewer devices visible "
        "(CUDA_VISIBLE_DEVICES, TPU_VISIBLE_CHIPS, or on CPU "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N)"
    )


def check_batch_size(batch_size: int, num_devices: int, *, option: str = "--batch_size") -> None:
    """**Raises:** `ShardingError` (a `ValueError`) naming both numbers and the fix, if
    `batch_size` does not split evenly over `num_devices`."""
    if batch_size < 1:
        raise ShardingError(f"batch size must be >= 1, got {batch_size}")
    if batch_size % num_devices != 0:
        raise ShardingError(_indivisible_message(batch_size, num_devices, option))


def _check_dtype(x: Any) -> None:
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else None
    if dtype is not None and jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ShardingError(
            f"a batch array has dtype {dtype}, which JAX would silently convert to "
            f"{jax.dtypes.canonicalize_dtype(dtype)} (jax_enable_x64 is off); cast it "
            "explicitly in the data pipeline"
        )


def shard_batch(batch: T, mesh: Mesh) -> T:
    """Place every array of `batch` with its leading axis split over the `"data"` axis.

    **Raises:** `ValueError` if an array has no leading axis, or a batch size is not
    divisible by the number of devices.
    """
    num_devices = mesh.shape[DATA_AXIS]
    sharding = batch_sharding(mesh)

    def _put(x: Any) -> Any:
        if not eqx.is_array(x):
            return x
        if np.ndim(x) == 0:
            raise ValueError("cannot shard a scalar: every batch array needs a leading batch axis")
        if x.shape[0] % num_devices != 0:
            raise ShardingError(_indivisible_message(x.shape[0], num_devices, None))
        return jax.device_put(x, sharding)

    return jax.tree.map(_put, batch)


def replicate(tree: T, mesh: Mesh) -> T:
    """Place every array of `tree` (model, optimiser state) on every device."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree)


# --------------------------------------------------------------------------------------
# Sharding pytrees for a whole state
# --------------------------------------------------------------------------------------


def fsdp_spec(
    shape: Sequence[int], dtype: Any, num_devices: int, *, min_size: int = FSDP_MIN_SIZE
) -> PartitionSpec:
    """`"data"` on the largest axis of `shape` divisible by `num_devices` (the first such
    axis on a tie); `PartitionSpec()` (replicated) for non-floating arrays, arrays with
    fewer than `min_size` elements, or when no axis divides."""
    if num_devices == 1 or not jnp.issubdtype(dtype, jnp.inexact) or math.prod(shape) < min_size:
        return PartitionSpec()
    axes = [a for a, size in enumerate(shape) if size % num_devices == 0 and size >= num_devices]
    if not axes:
        return PartitionSpec()
    axis = max(axes, key=lambda a: (shape[a], -a))
    return PartitionSpec(*(DATA_AXIS if a == axis else None for a in range(len(shape))))


def fsdp_shardings(tree: T, mesh: Mesh, *, min_size: int = FSDP_MIN_SIZE) -> T:
    """`tree` (an `eqx.Module`, optax state, `TrainState`, ...) with every array replaced
    by its FSDP `NamedSharding` (see `fsdp_spec`); non-array leaves are left as they are."""
    num_devices = mesh.shape[DATA_AXIS]

    def leaf(x: Any) -> Any:
        if not eqx.is_array(x):
            return x
        return NamedSharding(mesh, fsdp_spec(x.shape, x.dtype, num_devices, min_size=min_size))

    return jax.tree.map(leaf, tree)


def replicated_shardings(tree: T, mesh: Mesh) -> T:
    """`tree` with every array replaced by the replicated sharding of `mesh`."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: sharding if eqx.is_array(x) else x, tree)


def state_shardings(tree: T, mesh: Mesh, mode: str = "data", *, min_size: int = FSDP_MIN_SIZE) -> T:
    """The sharding pytree of `tree` for `mode` `"data"` (replicated) or `"fsdp"`."""
    _check_mode(mode)
    if mode == "fsdp":
        return fsdp_shardings(tree, mesh, min_size=min_size)
    return replicated_shardings(tree, mesh)


def _split(tree: Any, shardings: Any) -> tuple[Any, Any, Any]:
    arrays, static = eqx.partition(tree, eqx.is_array)
    specs, _ = eqx.partition(shardings, lambda s: isinstance(s, Sharding))
    return arrays, static, specs


def place(tree: T, shardings: Any) -> T:
    """`jax.device_put` every array of `tree` with its entry of `shardings` (a sharding
    pytree from `state_shardings`); when every array is already placed so, `tree` itself
    is returned (cheap enough to call before every step)."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    moved = [
        jax.device_put(x, s)
        if isinstance(s, Sharding) and not (isinstance(x, jax.Array) and x.sharding == s)
        else x
        for x, s in zip(leaves, targets)
    ]
    if all(a is b for a, b in zip(moved, leaves)):
        return tree
    return jax.tree.unflatten(treedef, moved)


def constrain(tree: T, shardings: Any) -> T:
    """Inside `jit`: `jax.lax.with_sharding_constraint` every array of `tree`."""
    arrays, static, specs = _split(tree, shardings)
    return eqx.combine(jax.lax.with_sharding_constraint(arrays, specs), static)


def _check_mode(mode: str) -> None:
    if mode not in SHARDING_MODES:
        raise ShardingError(
            f"unknown sharding mode {mode!r}; choose one of {', '.join(SHARDING_MODES)}"
        )


# --------------------------------------------------------------------------------------
# The one object the training scripts use
# --------------------------------------------------------------------------------------


class DataParallel:
    """Mesh, state placement, batch placement and the sharding-preserving step wrapper.

    **Arguments:**

    - `batch_size`: the global batch (summed over all devices and hosts).
    - `mode`: `"data"` (state replicated) or `"fsdp"` (large state arrays split over
        `"data"`, see `fsdp_spec`).
    - `num_devices`: use the first this many of `jax.devices()` (default: all).
    - `min_size`: FSDP leaves arrays with fewer elements than this replicated.
    - `option`: how the batch size is set, for the error message.

    **Raises:** `ShardingError` (a `ValueError`) right away if `batch_size` does not
    split evenly over the devices or `mode` is unknown.
    """

    def __init__(
        self,
        batch_size: int,
        mode: str = "data",
        *,
        num_devices: int | None = None,
        min_size: int = FSDP_MIN_SIZE,
        option: str = "--batch_size",
    ):
        _check_mode(mode)
        mesh = make_mesh(num_devices)
        self.num_devices = mesh.shape[DATA_AXIS]
        check_batch_size(batch_size, self.num_devices, option=option)
        self.mode = mode
        self.min_size = min_size
        self.global_batch = batch_size
        self.per_device_batch = batch_size // self.num_devices
        self.num_processes = jax.process_count()
        # One device: leave everything uncommitted (an explicit sharding would only make
        # the second step recompile, as jit's outputs come back with a different one).
        self.mesh: Mesh | None = mesh if self.num_devices > 1 else None
        self.shardings: Any = None

    # ---- reporting

    def info(self) -> dict[str, Any]:
        """JSON-ready summary: mode, devices, processes, global and per-device batch."""
        return {
            "mode": self.mode,
            "num_devices": self.num_devices,
            "num_processes": self.num_processes,
            "platform": jax.devices()[0].platform,
            "global_batch": self.global_batch,
            "per_device_batch": self.per_device_batch,
        }

    def describe(self) -> str:
        processes = f" on {self.num_processes} hosts" if self.num_processes > 1 else ""
        return (
            f"devices: {self.num_devices} x {jax.devices()[0].platform}{processes}, "
            f"sharding: {self.mode}; global batch {self.global_batch} = "
            f"{self.per_device_batch} per device x {self.num_devices}"
        )

    # ---- placement

    def place_state(self, state: T) -> T:
        """Replicate (`"data"`) or shard (`"fsdp"`) every array of `state`, and remember
        its shardings for `wrap_step`."""
        if self.mesh is None:
            return state
        self.shardings = state_shardings(state, self.mesh, self.mode, min_size=self.min_size)
        return place(state, self.shardings)

    def place_batch(self, batch: T) -> T:
        """The global batch `batch` (the same on every host), split over `"data"`.

        Each host contributes only the rows its own devices hold, through
        `jax.make_array_from_process_local_data`. **Raises:** `ShardingError` for an
        indivisible leading axis, a scalar, or a dtype JAX would silently change.
        """
        jax.tree.map(_check_dtype, batch, is_leaf=eqx.is_array)
        if self.mesh is None:
            return jax.device_put(batch)
        sharding = batch_sharding(self.mesh)

        def put(x: Any) -> Any:
            if not eqx.is_array(x):
                return x
            if np.ndim(x) == 0:
                raise ShardingError(
                    "cannot shard a scalar: every batch array needs a leading batch axis"
                )
            if x.shape[0] % self.num_devices != 0:
                raise ShardingError(_indivisible_message(x.shape[0], self.num_devices, None))
            start, stop = process_rows(sharding, x.shape)
            return jax.make_array_from_process_local_data(sharding, x[start:stop], x.shape)

        return jax.tree.map(put, batch)

    def wrap_step(
        self, train_step: Callable[[Any, Any, Any], tuple[Any, Any]]
    ) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
        """`train_step` jitted so the new state keeps the placed state's shardings (an
        in-graph `with_sharding_constraint`), and with its incoming state re-placed (a no-op
        unless the caller swapped in a fresh array, e.g. the loop's step counter), so the
        step compiles once. On one device: `train_step` itself."""
        if self.mesh is None:
            return train_step
        if self.shardings is None:
            raise RuntimeError("call `place_state` before `wrap_step`")
        shardings = self.shardings

        @eqx.filter_jit
        def sharded_step(state, batch, key):
            new_state, metrics = train_step(state, batch, key)
            return constrain(new_state, shardings), metrics

        def step(state, batch, key):
            return sharded_step(place(state, shardings), batch, key)

        return step


def process_rows(sharding: Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """`(start, stop)`: the rows of a global array of `shape`, split over its leading axis by
    `sharding`, held by this process's devices (all rows on a single host)."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(shape[0])
        starts.append(start)
        stops.append(stop)
    start, stop = min(starts), max(stops)
    held = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
    if held != stop - start:
        raise ShardingError(
            "this host's devices hold non-contiguous rows of the batch; order the mesh's "
            "devices by process (jax.devices() does)"
        )
    return start, stop


def initialize_distributed(argv: Sequence[str]) -> list[str]:
    """Multi-host start-up: if `argv` holds `--distributed`, call
    `jax.distributed.initialize()` and return `argv` without the flags read here.

    `--distributed` alone lets JAX find the coordinator, process count and process id
    (Cloud TPU, SLURM, Open MPI; the coordinator also from `JAX_COORDINATOR_ADDRESS`).
    Elsewhere add `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
    (dashes work too). Call this before anything else uses JAX.
    """
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--coordinator_address", "--coordinator-address", default=None)
    parser.add_argument("--num_processes", "--num-processes", type=int, default=None)
    parser.add_argument("--process_id", "--process-id", type=int, default=None)
    known, rest = parser.parse_known_args(list(argv))
    explicit = (known.coordinator_address, known.num_processes, known.process_id)
    if known.distributed or any(x is not None for x in explicit):
        jax.distributed.initialize(
            coordinator_address=known.coordinator_address,
            num_processes=known.num_processes,
            process_id=known.process_id,
        )
    return rest
