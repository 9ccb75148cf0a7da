"""Data parallelism over all visible devices with `jax.sharding` (no pmap).

The batch is split along its leading axis over a 1-D mesh with axis name `"data"`; the
training state is replicated. A jitted step then runs SPMD, and XLA inserts the gradient
all-reduce.

```python
mesh = make_mesh()                       # every visible device
state = replicate(state, mesh)
batch = shard_batch(get_batch(step), mesh)
state, metrics = train_step(state, batch, key)
```
On one device all of this is a no-op, so the same script runs on a laptop.
"""

from __future__ import annotations

from typing import Any, TypeVar

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


T = TypeVar("T")
DATA_AXIS = "data"


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
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by the number of devices "
                f"{num_devices}; "
                f"use a batch size that is a multiple of {num_devices}"
            )
        return jax.device_put(x, sharding)

    return jax.tree.map(_put, batch)


def replicate(tree: T, mesh: Mesh) -> T:
    """Place every array of `tree` (model, optimiser state) on every device."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree)
