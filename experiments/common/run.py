"""A run directory is one run, and the command line that starts or continues it.

`workdir/` holds `config.json` (the experiment, config name and every field), the
append-only `metrics.jsonl`, `latest.eqx` and `best.eqx`. The rules:

* a fresh start needs an empty (or absent) directory; `--overwrite` clears a used one;
* `--resume` continues from the run's own `config.json` (command-line overrides on top)
  and its newest intact checkpoint: a damaged `latest.eqx` falls back to `best.eqx` with a
  warning; a checkpoint that does not fit the config is refused;
* nothing is written until `Run.begin`, which a training script calls once its config is
  checked, its data loaded and its model built: a start that fails before that leaves the
  directory as it was. `begin` clears (`--overwrite`), removes temp files left by killed
  writes, writes `config.json` and drops metrics logged after the checkpoint resumed from.

`main` is the command line of both training scripts: every usage error is one
`error: ...` line on stderr and exit status 2, other failures one line and status 1, and
Ctrl-C one line (after the training script saved) and status 130.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, IO, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from . import config as cfg
from .checkpoint import (
    atomic_write,
    CheckpointError,
    DamagedCheckpoint,
    load_checkpoint,
    MismatchedCheckpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from .metrics import MetricsLogger
from .plotting import plot_metrics
from .sharding import initialize_distributed, ShardingError


S = TypeVar("S")
CONFIG_FILE = "config.json"


class RunError(RuntimeError):
    """A run directory that cannot be used as asked; one line that says what to do."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN/infinite loss or state; that state was not saved."""


class Run:
    """The files of one run in `workdir`."""

    def __init__(self, workdir: str | pathlib.Path):
        self.dir = pathlib.Path(workdir)
        self.latest = self.dir / "latest.eqx"
        self.best = self.dir / "best.eqx"
        self.metrics = MetricsLogger(self.dir)
        self.header: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}  # the last save's extra header fields
        self.last_saved: int | None = None
        self.throughput = Throughput(1, "units")

    # ---- before anything is written

    def saved_config(self) -> dict[str, Any] | None:
        """`config.json` of the run (`{"experiment", "name", "config"}`), `None` if absent."""
        path = self.dir / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            saved = None
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise RunError(f"{path} is not a run's config; start over with --overwrite")
        return saved

    def is_used(self) -> bool:
        return self.dir.is_dir() and any(self.dir.iterdir())

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse a fresh start in a used directory (unless `overwrite`)."""
        if resume and overwrite:
            raise RunError("--resume continues a run and --overwrite deletes it: give one")
        if not resume and not overwrite and self.is_used():
            raise RunError(
                f"{self.dir} already holds a run; continue it with --resume, "
                "or start over with --overwrite (deletes it)"
            )

    def restore(self, skeleton: S) -> tuple[S, dict[str, Any]]:
        """`(state, header)` of the newest intact checkpoint, loaded into `skeleton`
        (`(skeleton, {})` if there is none).

        A damaged `latest.eqx` falls back to `best.eqx` with a one-line warning.
        **Raises:** `RunError` when no checkpoint is intact or one does not fit.
        """
        candidates = [path for path in (self.latest, self.best) if path.is_file()]
        damaged: DamagedCheckpoint | None = None
        for path in candidates:
            try:
                state, header = load_checkpoint(path, skeleton)
            except DamagedCheckpoint as e:
                if path is candidates[-1]:
                    also = f" ({self.latest.name} is damaged too)" if damaged else ""
                    raise RunError(
                        f"{e}{also}; no intact checkpoint to resume from; "
                        "start over with --overwrite"
                    ) from None
                damaged = e
                continue
            except MismatchedCheckpoint as e:
                raise RunError(f"{e}; resume with the run's config, or use --overwrite") from None
            if damaged is not None:  # only said once the fall-back has worked
                print(f"warning: {damaged}; falling back to {path}", file=sys.stderr)
            self.last_saved = int(header["step"])
            print(f"resumed from {path} at step {header['step']}")
            return state, header
        return skeleton, {}

    # ---- the point of no return

    def begin(
        self,
        header: dict[str, Any],
        *,
        step: int,
        overwrite: bool = False,
        units_per_step: int = 1,
        unit: str = "units",
    ) -> None:
        """Make `workdir` this run's: clear it (`overwrite`), remove stale temp files, write
        `config.json` from `header`, drop metrics logged after `step`. Throughput is
        reported in `unit`s (`units_per_step` per step)."""
        self.throughput = Throughput(units_per_step, unit)
        if overwrite and self.dir.is_dir():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in remove_stale_temp_files(self.dir):
            print(f"removed {tmp.name}, left by a killed write")
        text = json.dumps(header, indent=2) + "\n"
        atomic_write(self.dir / CONFIG_FILE, lambda f: f.write(text.encode("utf-8")))
        dropped = self.metrics.truncate(after_step=step)
        if dropped:
            print(f"dropped {dropped} metrics records logged after step {step}")
        self.header = dict(header)

    # ---- while training

    def due(self, done: int, config: Any) -> tuple[bool, bool, bool]:
        """Whether step `done` logs, evaluates and saves (every `log_every`,
        `eval_every`, `checkpoint_every` steps of `config`, and all three at the last)."""
        last = done == config.train_steps
        return tuple(  # pyright: ignore[reportReturnType]
            done % every == 0 or last
            for every in (config.log_every, config.eval_every, config.checkpoint_every)
        )

    def log(self, step: int, split: str, show: Sequence[str] = (), **values: Any) -> None:
        """Append a metrics record, and print the `show` values on one line.

        **Raises:** `NonFiniteError` for a NaN/infinite `loss` (after logging it).
        """
        shown = [f"{k} {values[k]:.4g}" for k in show if k in values]
        print(" | ".join([f"{split} step {step}", *shown]), flush=True)
        self.throughput.sync(step)
        self.metrics.log(step, split, **values)
        loss = values.get("loss")
        if loss is not None and not math.isfinite(loss):
            kept = f"{self.latest} keeps step {self.last_saved}" if self.last_saved else "not saved"
            raise NonFiniteError(
                f"{split} loss is {loss} at step {step} ({kept}); "
                "try a lower --lr, --grad_clip=1, or a more stable solver"
            )

    def save(self, state: Any, *, best: bool = False, **extra: Any) -> pathlib.Path:
        """Write `state` (with a `step` field) to `latest.eqx`, and to `best.eqx` if `best`.

        **Raises:** `NonFiniteError`, writing nothing, if `state` holds NaN or infinity.
        """
        step = int(state.step)
        if not _all_finite(state):
            kept = f"{self.latest} keeps step {self.last_saved}" if self.last_saved else "not saved"
            raise NonFiniteError(
                f"non-finite parameters at step {step} ({kept}); "
                "try a lower --lr, --grad_clip=1, or a more stable solver"
            )
        self.extra = extra
        if step != self.last_saved or not self.latest.is_file():
            save_checkpoint(self.latest, state, {**self.header, **extra, "step": step})
            self.last_saved = step
        if best:

            def _copy(f: IO[bytes]) -> None:
                with open(self.latest, "rb") as src:
                    shutil.copyfileobj(src, f)

            atomic_write(self.best, _copy)
        self.throughput.sync(step)
        return self.latest

    def fetch(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """`metrics` as Python floats (a host sync), with `ms_per_step` and `<unit>_per_s`
        over the steps since the last log or save (none in the first window, which
        includes compilation)."""
        return self.throughput.fetch(metrics, step)

    def interrupted(self, state: Any) -> None:
        """On Ctrl-C: save `state` (with the last save's extra fields), then raise
        `KeyboardInterrupt` with the one line to show."""
        path = self.save(state, **self.extra)
        raise KeyboardInterrupt(f"saved step {int(state.step)} to {path}; continue with --resume")

    # ---- at the end

    def finish(self, results: dict[str, Any], panels: dict[str, list[tuple[str, str]]]) -> None:
        """Write `results.json` and plot `metrics.jsonl` into `curves.png`."""
        (self.dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_metrics(self.dir, self.dir / "curves.png", panels=panels)


class Throughput:
    """Milliseconds per step and units per second between host syncs; the first window,
    which includes compilation, is not timed."""

    def __init__(self, units_per_step: int, unit: str):
        self.units_per_step, self.unit = units_per_step, unit
        self.last: tuple[float, int] | None = None

    def fetch(self, metrics: Mapping[str, Any], done: int) -> dict[str, float]:
        """`metrics` as Python floats (a host sync), with `ms_per_step` and
        `<unit>_per_s` since the last `sync` (none before it)."""
        values = {name: float(value) for name, value in metrics.items()}
        if self.last is not None:
            ms = 1e3 * (time.perf_counter() - self.last[0]) / (done - self.last[1])
            values |= {"ms_per_step": ms, f"{self.unit}_per_s": 1e3 * self.units_per_step / ms}
        return values

    def sync(self, done: int) -> None:
        """After a host sync (log line, evaluation, save): the next window starts here."""
        self.last = (time.perf_counter(), done)


@eqx.filter_jit
def _finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
    return not jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array)) or bool(_finite(tree))


# --------------------------------------------------------------------------------------
# The command line of a training script
# --------------------------------------------------------------------------------------

_RUN_OPTIONS = ("config", "workdir", "resume", "overwrite")


def parse_cli(
    argv: Sequence[str], configs: Mapping[str, Any], *, default: str, experiment: str
) -> tuple[Any, pathlib.Path, bool, bool, str]:
    """`(config, workdir, resume, overwrite, name)` from `--key=value` arguments.

    `--config=NAME` picks the base config (default `default`), `--workdir=DIR` the run
    directory (default `runs/<experiment>-<NAME>`), `--resume`/`--overwrite` what to do
    with it; every other `--key=value` overrides a config field. With `--resume` the base
    is the run's own `config.json`. The result is validated. **Raises:** `ConfigError`,
    `RunError`; `SystemExit(0)` after printing `--help`.
    """
    pairs = cfg.split_args(argv)
    run = {k: pairs.pop(k) for k in (*_RUN_OPTIONS, "help") if k in pairs}
    flags = {}
    for flag in ("resume", "overwrite"):
        text = run.get(flag, "false") or "true"
        if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
            raise cfg.ConfigError(f"--{flag}={text}: expected true or false")
        flags[flag] = text.lower() in ("true", "1", "yes")
    name = run.get("config") or default
    if name not in configs:
        raise cfg.ConfigError(f"--config={name}: unknown; choose from {', '.join(configs)}")
    workdir = pathlib.Path(run.get("workdir") or f"runs/{experiment}-{name}")
    runs = Run(workdir)
    runs.check(resume=flags["resume"], overwrite=flags["overwrite"])
    base = configs[name]
    saved = runs.saved_config() if flags["resume"] else None
    if saved is not None:
        if saved.get("experiment") != experiment:
            raise RunError(f"{workdir} holds a {saved.get('experiment')} run, not {experiment}")
        if run.get("config") and run["config"] != saved.get("name"):
            raise cfg.ConfigError(
                f"--config={name} but {workdir} is a {saved.get('name')!r} run; "
                "drop --config to resume it"
            )
        name = saved.get("name", name)
        base = cfg.from_dict(type(base), saved["config"])
        print(f"resuming {workdir} with its config.json")
    elif flags["resume"] and runs.is_used():
        raise RunError(f"{workdir} holds no {CONFIG_FILE}: not a run to resume")
    if "help" in run:
        print(f"--config={name} (choose from {', '.join(configs)}); override with --key=value:")
        print(cfg.describe(base))
        raise SystemExit(0)
    config, values = cfg.apply_overrides(base, pairs)
    cfg.validate(config)
    for key, value in values.items():
        print(f"override {key} = {value!r} (was {getattr(base, key)!r})")
    return config, workdir, flags["resume"], flags["overwrite"], name


def main(
    train: Callable[..., Any],
    configs: Mapping[str, Any],
    argv: Sequence[str] | None,
    *,
    default: str,
    experiment: str,
    errors: tuple[type[BaseException], ...] = (),
) -> Any:
    """Parse `argv`, then `train(config, workdir, name=, resume=, overwrite=)`; every failure
    is one line: usage errors exit 2, `errors` (data, ...) and non-finite training exit 1,
    Ctrl-C exits 130."""
    usage = (cfg.ConfigError, RunError, ShardingError)
    try:
        argv = initialize_distributed(list(sys.argv[1:] if argv is None else argv))
        config, workdir, resume, overwrite, name = parse_cli(
            argv, configs, default=default, experiment=experiment
        )
        return train(config, workdir, name=name, resume=resume, overwrite=overwrite)
    except usage as e:
        _exit(2, f"error: {e}")
    except (*errors, NonFiniteError, CheckpointError) as e:
        _exit(1, f"error: {e}")
    except KeyboardInterrupt as e:
        _exit(130, f"interrupted: {e}" if str(e) else "interrupted")


def _exit(code: int, message: str) -> None:
    print(message.strip().splitlines()[0] if message.strip() else message, file=sys.stderr)
    raise SystemExit(code)
