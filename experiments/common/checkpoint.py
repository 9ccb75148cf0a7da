"""Checkpoints that prove themselves: a JSON header line, then `eqx.tree_serialise_leaves`.

As in equinox's serialisation example, the header carries what is needed to rebuild a
skeleton (the config, the step, ...) and the leaves are read back into that skeleton. The
header also holds the `xxh3_128` checksum and the `bytes` of the leaves, checked on every
load, so a truncated, zero-filled or bit-flipped file is reported (`DamagedCheckpoint`)
instead of loaded. XXH3 (128-bit) misses accidental damage with probability 2^-128; it
guards against accidents, not tampering, and runs at memory speed, where sha256 or even
CRC-32 would add a noticeable share to saving and loading a large state. No pickle.

Writes are atomic: a temp file `.<name>.<random>.tmp` in the same directory, `fsync`, then
`os.replace`; a killed write leaves at most that temp file, which `remove_stale_temp_files`
deletes at the next start.

```python
save_checkpoint("runs/x/latest.eqx", state, {"config": config_dict, "step": 100})
state, header = load_checkpoint("runs/x/latest.eqx", like=state)
```
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any, IO, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import xxhash


T = TypeVar("T")
PathLike = str | os.PathLike[str]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


class DamagedCheckpoint(CheckpointError):
    """The file is not what was written: unreadable header, wrong size or checksum."""


class MismatchedCheckpoint(CheckpointError):
    """The file is intact but holds a different structure than the skeleton."""


# --------------------------------------------------------------------------------------
# Leaves: equinox's defaults plus typed PRNG keys and multi-host arrays
# --------------------------------------------------------------------------------------


def _is_key_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _serialise_leaf(f: IO[bytes], x: Any) -> None:
    if _is_key_array(x):
        jnp.save(f, jax.random.key_data(x))
        return
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        # Split across hosts (FSDP on several processes): every process gathers the whole
        # array (a collective; all processes save the same tree in the same order).
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    eqx.default_serialise_filter_spec(f, x)


def _deserialise_leaf(f: IO[bytes], like: Any) -> Any:
    if _is_key_array(like):
        return jax.random.wrap_key_data(jnp.load(f), impl=jax.random.key_impl(like))
    return eqx.default_deserialise_filter_spec(f, like)


def _place_like(new: Any, like: Any) -> Any:
    """Put a loaded array on its skeleton leaf's devices when those are several."""
    if (
        isinstance(new, jax.Array)
        and isinstance(like, jax.Array)
        and len(like.sharding.device_set) > 1
    ):
        return jax.device_put(new, like.sharding)
    return new


# --------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> pathlib.Path:
    """Call `write(f)` on a temp file next to `path`, fsync it, rename it over `path`.

    If `write` raises (or the process is interrupted), the temp file is removed and any
    existing file at `path` is left untouched.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not supported everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def remove_stale_temp_files(directory: PathLike) -> list[pathlib.Path]:
    """Delete the `.*.tmp` files that writes killed mid-way left in `directory`."""
    stale = sorted(pathlib.Path(directory).glob(".*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


# --------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------


def _checksum(payload: Any) -> str:
    return xxhash.xxh3_128(payload).hexdigest()


def save_checkpoint(path: PathLike, tree: Any, header: dict[str, Any]) -> None:
    """Atomically write `header` (one JSON line, plus the leaves' `xxh3_128` checksum and
    `bytes`) and the leaves of `tree` to `path`."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree, filter_spec=_serialise_leaf)
    payload = buffer.getbuffer()
    header = {**header, "xxh3_128": _checksum(payload), "bytes": len(payload)}
    line = json.dumps(header, sort_keys=True).encode("utf-8") + b"\n"

    def _write(f: IO[bytes]) -> None:
        f.write(line)
        f.write(payload)

    atomic_write(path, _write)


def read_header(path: PathLike) -> dict[str, Any]:
    """The JSON header of checkpoint `path`, without reading (or checking) the leaves.
    **Raises:** `DamagedCheckpoint` if the first line is not a JSON object."""
    with open(path, "rb") as f:
        return _parse_header(f.readline(), path)


def _parse_header(line: bytes, path: PathLike) -> dict[str, Any]:
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("xxh3_128"), str):
        raise DamagedCheckpoint(f"{path} is damaged: its first line is not a checkpoint header")
    return header


def load_checkpoint(path: PathLike, like: T) -> tuple[T, dict[str, Any]]:
    """`(tree, header)` from `path`, after checking the leaves' size and checksum.

    `like` is a skeleton with the structure, shapes and dtypes of the saved tree (the
    state at initialisation, or `eqx.filter_eval_shape` of it). Loaded arrays are placed
    like the skeleton's when those span several devices.

    **Raises:** `DamagedCheckpoint` (truncated, zero-filled, bit-flipped, ...) or
    `MismatchedCheckpoint` (intact, but another structure), each with a one-line message.
    """
    with open(path, "rb") as f:
        header = _parse_header(f.readline(), path)
        payload = f.read()
    if len(payload) != header.get("bytes"):
        raise DamagedCheckpoint(
            f"{path} is damaged: {len(payload)} bytes of arrays, its header says {header.get('bytes')}"
        )
    if _checksum(payload) != header["xxh3_128"]:
        raise DamagedCheckpoint(f"{path} is damaged: the arrays do not match their checksum")
    stream = io.BytesIO(payload)
    try:
        tree = eqx.tree_deserialise_leaves(stream, like, filter_spec=_deserialise_leaf)
    except (RuntimeError, ValueError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MismatchedCheckpoint(f"{path} does not fit this model: {first}") from None
    if stream.tell() != len(payload):
        raise MismatchedCheckpoint(f"{path} does not fit this model: it holds more arrays")
    return jax.tree.map(_place_like, tree, like), header
