"""Checkpoints: one file, a JSON header line, then `eqx.tree_serialise_leaves` bytes.

Following equinox's serialisation example, the header carries everything needed to
rebuild a skeleton (the config dict, the step, ...), and the leaves are restored into
that skeleton with `eqx.tree_deserialise_leaves`. No pickle. Writes are atomic: a temp
file in the same directory, `fsync`, then `os.replace`, so a crash never leaves a
half-written checkpoint behind.

```python
header = {"config": config_to_dict(config), "step": 100}
save_checkpoint("runs/x/latest.eqx", state, header)
header = read_header("runs/x/latest.eqx")
state, header = load_checkpoint("runs/x/latest.eqx", like=state)  # same structure
```
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, IO, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp


T = TypeVar("T")
PathLike = str | os.PathLike[str]

LATEST = "latest.eqx"
BEST = "best.eqx"


# --------------------------------------------------------------------------------------
# Leaf (de)serialisation: equinox's defaults plus typed PRNG keys
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


def _fsync_dir(directory: pathlib.Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows); best effort
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    _fsync_dir(path.parent)
    return path


def _header_line(header: dict[str, Any]) -> bytes:
    if not isinstance(header, dict):
        raise TypeError(f"checkpoint header must be a dict, got {type(header).__name__}")
    try:
        text = json.dumps(header, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"checkpoint header must be JSON-serialisable (use config_to_dict for configs): {e}"
        ) from e
    return text.encode("utf-8") + b"\n"


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def save_checkpoint(path: PathLike, tree: Any, header: dict[str, Any]) -> None:
    """Atomically write `header` (one JSON line) and the leaves of `tree` to `path`.

    **Arguments:**

    - `path`: destination file; its directory is created if needed.
    - `tree`: any PyTree (an `eqx.Module` state, optax state, `eqx.nn.State`, ...).
        Arrays, NumPy arrays, Python scalars and typed PRNG keys are saved; other leaves
        come from the skeleton when loading.
    - `header`: JSON-serialisable dict, e.g. `{"config": config_to_dict(config), "step":
        100}`.
    """
    line = _header_line(header)

    def _write(f: IO[bytes]) -> None:
        f.write(line)
        eqx.tree_serialise_leaves(f, tree, filter_spec=_serialise_leaf)

    atomic_write(path, _write)


def _read_header_from(f: IO[bytes], path: PathLike) -> dict[str, Any]:
    line = f.readline()
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a checkpoint: its first line is not a JSON header") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a checkpoint: its header is not a JSON object")
    return header


def read_header(path: PathLike) -> dict[str, Any]:
    """The JSON header of checkpoint `path`, without reading the arrays."""
    with open(path, "rb") as f:
        return _read_header_from(f, path)


def load_checkpoint(path: PathLike, like: T) -> tuple[T, dict[str, Any]]:
    """Load `(tree, header)` from `path`.

    `like` is a skeleton with the structure, shapes and dtypes of the saved tree: the
    state at initialisation, or `eqx.filter_eval_shape(...)` of it. Loaded arrays are
    placed like the skeleton's arrays when those are sharded over several devices.

    **Raises:** `ValueError` if the file does not match the skeleton (with the offending
    leaf).
    """
    with open(path, "rb") as f:
        header = _read_header_from(f, path)
        try:
            tree = eqx.tree_deserialise_leaves(f, like, filter_spec=_deserialise_leaf)
        except (RuntimeError, ValueError, OSError, EOFError) as e:
            raise ValueError(f"checkpoint {path} does not match the given skeleton: {e}") from e
        if f.read(1):
            raise ValueError(
                f"checkpoint {path} holds more data than the skeleton has leaves: "
                "the skeleton has a different structure from the saved tree"
            )
    tree = jax.tree.map(_place_like, tree, like)
    return tree, header


class CheckpointManager:
    """`latest.eqx` and `best.eqx` in one work directory.

    **Arguments:**

    - `workdir`: the run's directory (created on the first save).
    """

    def __init__(self, workdir: PathLike):
        self.workdir = pathlib.Path(workdir)

    @property
    def latest_file(self) -> pathlib.Path:
        return self.workdir / LATEST

    @property
    def best_file(self) -> pathlib.Path:
        return self.workdir / BEST

    def save(self, tree: Any, header: dict[str, Any], *, best: bool = False) -> None:
        """Write `latest.eqx`; with `best=True` also copy it to `best.eqx`."""
        save_checkpoint(self.latest_file, tree, header)
        if best:

            def _copy(f: IO[bytes]) -> None:
                with open(self.latest_file, "rb") as src:
                    shutil.copyfileobj(src, f)

            atomic_write(self.best_file, _copy)

    def latest_path(self) -> pathlib.Path | None:
        """Path of `latest.eqx`, or `None` if there is none yet."""
        return self.latest_file if self.latest_file.is_file() else None

    def best_path(self) -> pathlib.Path | None:
        """Path of `best.eqx`, or `None` if there is none yet."""
        return self.best_file if self.best_file.is_file() else None

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.workdir)!r})"
