"""Append-only JSONL metrics: one `{"step", "split", "time", ...}` per line.

```python
logger = MetricsLogger("runs/x")                 # -> runs/x/metrics.jsonl
logger.log(100, "train", loss=loss, ms_per_step=12.5)
logger.log(100, "val", loss=2.31, ppl=10.1)
records = read_metrics("runs/x/metrics.jsonl")
```
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any, IO

import numpy as np

from .checkpoint import atomic_write


METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "split", "time")


def metrics_file(path: str | os.PathLike[str]) -> pathlib.Path:
    """`path` if it has a suffix (a file: `x.jsonl`), else `path/metrics.jsonl`."""
    path = pathlib.Path(path)
    if path.is_dir() or path.suffix == "":
        return path / METRICS_FILE
    return path


def to_python(value: Any) -> Any:
    """JAX/NumPy scalars -> Python `int`/`float`/`bool`; arrays -> nested lists."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "__array__") or isinstance(value, np.generic):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    raise TypeError(f"cannot log a value of type {type(value).__name__}: {value!r}")


class MetricsLogger:
    """Appends one JSON line per `log` call to a metrics file.

    **Arguments:**

    - `path`: the JSONL file, or a work directory (then `path/metrics.jsonl`). Parent
        directories are created on the first write.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = metrics_file(path)

    def log(self, step: int, split: str, **values: Any) -> None:
        """Append `{"step": step, "split": split, "time": <unix seconds>, **values}`.

        JAX/NumPy scalars become Python numbers (a host sync for device arrays: call
        this at log steps only). Non-finite floats are written as `NaN`/`Infinity`,
        which `read_metrics` reads.
        """
        clash = [k for k in values if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved; use other names")
        record: dict[str, Any] = {
            "step": int(step),
            "split": str(split),
            "time": time.time(),
        }
        record.update({k: to_python(v) for k, v in values.items()})
        line = json.dumps(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def truncate(self, after_step: int) -> int:
        """Drop records with `step > after_step`.

        Used when resuming from a checkpoint at `after_step`, so that metrics logged
        after that checkpoint by a crashed run do not appear twice; a torn last line is
        dropped too, so that new records do not continue it.

        Rewrites the file atomically; returns the number of records dropped.
        """
        if not self.path.is_file():
            return 0
        records = read_metrics(self.path)
        kept = [r for r in records if r.get("step", 0) <= after_step]
        dropped = len(records) - len(kept)
        torn = not self.path.read_bytes().endswith(b"\n")
        if dropped or torn:

            def _write(f: IO[bytes]) -> None:
                for record in kept:
                    f.write((json.dumps(record) + "\n").encode("utf-8"))

            atomic_write(self.path, _write)
        return dropped

    def __repr__(self) -> str:
        return f"MetricsLogger({str(self.path)!r})"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a metrics file (or of `path/metrics.jsonl` for a directory).

    A last line cut short by a killed write is skipped, with a one-line note on stderr; a
    malformed line elsewhere raises `ValueError`. Returns `[]` if the file does not exist.
    """
    file = metrics_file(path)
    if not file.is_file():
        return []
    lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                print(f"note: skipped the torn last line of {file}", file=sys.stderr)
                break
            raise ValueError(f"{file}:{i + 1} is not valid JSON: {e}") from e
    return records


def is_finite_number(value: Any) -> bool:
    """True for an `int`/`float` that is not NaN or infinite (booleans excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
