"""The training loop shared by the experiments: logs, evaluation, checkpoints, resume.

The experiment supplies the pieces that differ (a jitted `train_step`, a deterministic
`get_batch`, an `evaluate`), and `train_loop` does the rest:

```python
state = TrainState.create(model, optimizer)
state = train_loop(
    spec=LoopSpec(total_steps=5000, log_every=50, eval_every=500, checkpoint_every=1000,
                  workdir=Path("runs/lm"), seed=0),
    state=state, train_step=train_step, get_batch=get_batch, evaluate=evaluate,
    header={"config": config_to_dict(config)}, resume=config.resume,
    unit_name="tokens", units_per_step=batch_size * seq_len,
    best_key="loss", best_mode="min",
)
```

Step `s` (0-based: the number of updates already applied) uses `get_batch(s)` and the
key `jax.random.fold_in(jax.random.key(seed), s)`, so a run resumed from a checkpoint
replays exactly the batches and randomness of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Bool, Int, PyTree
from tqdm.auto import tqdm

from .checkpoint import atomic_write, CheckpointManager, load_checkpoint, read_header
from .metrics import is_finite_number, MetricsLogger, to_python
from .optim import count_params


S = TypeVar("S")
_POSTFIX_KEYS = ("nfe", "acc")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/infinite loss or parameters; that state was not saved."""


def _as_step(x: Any) -> Any:
    return jnp.asarray(x, dtype=jnp.int32) if isinstance(x, int) else jnp.asarray(x)


class TrainState(eqx.Module):
    """Everything a training run updates: model, optimiser state and step counter.

    **Fields:**

    - `model`: the `eqx.Module` being trained.
    - `opt_state`: the optax state, initialised on `eqx.filter(model,
        eqx.is_inexact_array)`.
    - `step`: number of optimiser updates applied so far (an int32 array, so that jitted
        steps do not recompile as it changes).
    - `model_state`: `eqx.nn.State` for stateful layers such as `eqx.nn.BatchNorm`, else
        `None`.
    """

    model: PyTree
    opt_state: PyTree
    step: Int[Array, ""] = eqx.field(converter=_as_step)
    model_state: eqx.nn.State | None = None

    @classmethod
    def create(
        cls,
        model: PyTree,
        optimizer: optax.GradientTransformation,
        *,
        model_state: eqx.nn.State | None = None,
    ) -> TrainState:
        """Step 0: `optimizer` initialised on the floating-point arrays of `model`."""
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        return cls(model=model, opt_state=opt_state, step=0, model_state=model_state)

    def apply_gradients(
        self,
        grads: PyTree,
        optimizer: optax.GradientTransformation,
        *,
        model_state: eqx.nn.State | None = None,
    ) -> TrainState:
        """One optimiser update (inside the jitted step): the state at `step + 1`.

        `grads` is the gradient w.r.t. `eqx.filter(model, eqx.is_inexact_array)` (what
        `eqx.filter_grad`/`eqx.filter_value_and_grad` return). `model_state`, if given,
        replaces the stored `eqx.nn.State` (e.g. updated BatchNorm statistics).
        """
        params = eqx.filter(self.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, self.opt_state, params)
        return TrainState(
            model=eqx.apply_updates(self.model, updates),
            opt_state=opt_state,
            step=self.step + 1,
            model_state=self.model_state if model_state is None else model_state,
        )


@dataclasses.dataclass
class LoopSpec:
    """When `train_loop` logs, evaluates and saves, and where.

    **Fields:**

    - `total_steps`: train until `state.step == total_steps` (a resumed run continues to
        it).
    - `log_every`: log train metrics (one host sync) every this many steps, and at the
        last step.
    - `eval_every`: call `evaluate` every this many steps, and at the last step.
    - `checkpoint_every`: write `latest.eqx` every this many steps, and at the last
        step.
    - `workdir`: the run directory (`config.json`, `metrics.jsonl`, `latest.eqx`,
        `best.eqx`).
    - `seed`: the key for step `s` is `jax.random.fold_in(jax.random.key(seed), s)`.
    """

    total_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    workdir: pathlib.Path
    seed: int

    def __post_init__(self) -> None:
        self.workdir = pathlib.Path(self.workdir)
        if self.total_steps < 0:
            raise ValueError(f"`total_steps` must be >= 0, got {self.total_steps}")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@eqx.filter_jit
def _all_finite(tree: PyTree) -> Bool[Array, ""]:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return (
        jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        if leaves
        else jnp.array(True)
    )


def _with_step(state: S, step: int) -> S:
    """`state` with `state.step` set to `step` (keeping its dtype if it is an array)."""
    old = state.step  # pyright: ignore[reportAttributeAccessIssue]
    dtype = old.dtype if isinstance(old, jax.Array) else jnp.int32
    return eqx.tree_at(lambda s: s.step, state, jnp.asarray(step, dtype=dtype))


def _rate(x: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= threshold:
            return f"{x / threshold:.1f}{suffix}"
    return f"{x:.1f}"


def _short(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


class _Throughput:
    """Wall time per step over windows ending in a host sync (no compilation)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.steps = 0

    def start(self) -> None:
        self.t0, self.steps = time.perf_counter(), 0

    def restart_if_running(self) -> None:
        if self.t0 is not None:
            self.start()

    def tick(self) -> None:
        if self.t0 is not None:
            self.steps += 1

    def read(self) -> float | None:
        """Seconds per step since `start` (call right after a sync); restarts."""
        if self.t0 is None or self.steps == 0:
            return None
        seconds = (time.perf_counter() - self.t0) / self.steps
        self.start()
        return seconds


@dataclasses.dataclass
class _Best:
    key: str
    mode: Literal["min", "max"]
    value: float | None = None
    step: int | None = None

    def improves(self, value: Any) -> bool:
        if not is_finite_number(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def as_dict(self) -> dict[str, Any] | None:
        if self.value is None:
            return None
        return {
            "key": self.key,
            "mode": self.mode,
            "value": self.value,
            "step": self.step,
        }

    def restore(self, stored: Any) -> None:
        if (
            isinstance(stored, Mapping)
            and stored.get("key") == self.key
            and stored.get("mode") == self.mode
            and is_finite_number(stored.get("value"))
        ):
            self.value, self.step = float(stored["value"]), stored.get("step")


def _config_diff(old: Any, new: Any) -> list[str]:
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return [] if old == new else ["config"]
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train_loop(
    *,
    spec: LoopSpec,
    state: S,
    train_step: Callable[[S, Any, Any], tuple[S, Mapping[str, Any]]],
    get_batch: Callable[[int], Any],
    evaluate: Callable[[S], Mapping[str, float]] | None,
    header: dict[str, Any],
    resume: bool,
    unit_name: str = "tokens",
    units_per_step: int = 1,
    best_key: str = "loss",
    best_mode: str = "min",
    progress: bool = True,
) -> S:
    """Train `state` to `spec.total_steps`, logging, evaluating and checkpointing.

    **Arguments:**

    - `spec`: the `LoopSpec` (step counts, work directory, seed).
    - `state`: a `TrainState` (or any `eqx.Module` with `model`, `opt_state`, `step`
        fields). When resuming it is the skeleton the checkpoint is loaded into.
    - `train_step`: `(state, batch, key) -> (state, metrics)`, jitted by the caller;
        `metrics` is a dict of scalar arrays that includes `"loss"` (and, if available,
        `"nfe"`, `"acc"`, ...). The loop owns the step counter: it writes the number of
        completed steps into `state.step` before evaluating, saving and returning, so
        `train_step` may increment it or leave it.
    - `get_batch`: `step -> batch`, deterministic in `step`.
    - `evaluate`: `state -> {name: float}` validation metrics, called every
        `spec.eval_every` steps and at the last step; logged with `split="val"`. `None`
        disables evaluation.
    - `header`: JSON-serialisable dict (typically `{"config": config_to_dict(config),
        ...}`), written to `workdir/config.json` and into every checkpoint, with
        `"step"` and `"best"` added.
    - `resume`: continue from `workdir/latest.eqx` if it exists (else start fresh).
    - `unit_name`, `units_per_step`: throughput unit (`"tokens"`, `"images"`) and how
        many one step processes, for the `<unit>_per_s` figure.
    - `best_key`, `best_mode`: the validation metric (`"min"` or `"max"`) that decides
        `best.eqx`.
    - `progress`: show a tqdm bar (postfix: loss, throughput, nfe, acc). With `False`,
        print one line per log step instead.

    **Returns:** the final state, with `state.step == spec.total_steps`.

    **Raises:** `NonFiniteLossError` when the loss or the parameters stop being finite;
    the bad state is not saved, so `latest.eqx` keeps the last good checkpoint. On
    `KeyboardInterrupt` the current state is saved to `latest.eqx` (if finite) and the
    interrupt is re-raised.

    Metrics are fetched from the device (a host sync) only at log, evaluation and
    checkpoint steps; the first two steps of each invocation (compilation) are left out
    of the throughput. Each train record in `metrics.jsonl` carries `ms_per_step` and
    `<unit>_per_s` once measured.
    """
    if best_mode not in ("min", "max"):
        raise ValueError(f"`best_mode` must be 'min' or 'max', got {best_mode!r}")
    if units_per_step < 1:
        raise ValueError(f"`units_per_step` must be >= 1, got {units_per_step}")
    workdir = spec.workdir
    total = spec.total_steps
    manager = CheckpointManager(workdir)
    logger = MetricsLogger(workdir)
    best = _Best(best_key, best_mode)  # pyright: ignore[reportArgumentType]
    rate_key = f"{unit_name}_per_s"

    # ---- config.json (this also checks early that `header` is JSON-serialisable)
    try:
        config_text = json.dumps(header, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"`header` must be JSON-serialisable (use config_to_dict for configs): {e}"
        ) from e
    atomic_write(workdir / "config.json", lambda f: f.write(config_text.encode("utf-8") + b"\n"))

    # ---- where to start
    last_saved: int | None = None
    latest = manager.latest_path()
    if resume and latest is not None:
        state, saved_header = load_checkpoint(latest, state)
        start = int(saved_header.get("step", int(state.step)))  # pyright: ignore[reportAttributeAccessIssue]
        state = _with_step(state, start)
        last_saved = start
        best.restore(saved_header.get("best"))
        best_file = manager.best_path()
        if best_file is not None:
            best.restore(read_header(best_file).get("best"))
        print(f"resumed from {latest} at step {start}")
        changed = _config_diff(saved_header.get("config"), header.get("config"))
        if changed:
            print(f"note: config differs from the checkpoint's in: {', '.join(changed)}")
    else:
        if resume:
            print(f"no checkpoint in {workdir}; starting from scratch")
        elif latest is not None:
            print(
                f"note: starting fresh in {workdir}; its existing checkpoints will be overwritten"
            )
        start = int(state.step)  # pyright: ignore[reportAttributeAccessIssue]
    dropped = logger.truncate(after_step=start)
    if dropped:
        print(f"dropped {dropped} metrics records after step {start} from {logger.path}")
    if start >= total:
        print(f"already at step {start} >= total_steps={total}; nothing to do")
        return state

    print(
        f"training steps {start} -> {total}: {count_params(state.model):,} parameters, "  # pyright: ignore[reportAttributeAccessIssue]
        f"{units_per_step:,} {unit_name}/step, workdir {workdir}"
    )

    base_key = jr.key(spec.seed)
    bar = tqdm(
        total=total,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        disable=not progress,
        file=sys.stderr,
    )

    def say(message: str) -> None:
        if progress:
            bar.write(message)
        else:
            print(message, flush=True)

    def save(state: S, done: int, metrics: Mapping[str, Any] | None, *, as_best: bool) -> S:
        """Check that `state` is finite, then write it to latest.eqx (and best.eqx)."""
        if metrics is not None:
            loss = to_python(jax.device_get(metrics["loss"]))
            if not is_finite_number(loss):
                raise NonFiniteLossError(
                    _nonfinite_message(f"loss is {loss}", done, last_saved, manager)
                )
        if not bool(_all_finite(state)):
            raise NonFiniteLossError(
                _nonfinite_message(
                    "the parameters/optimiser state are non-finite",
                    done,
                    last_saved,
                    manager,
                )
            )
        state = _with_step(state, done)
        manager.save(
            state,
            {**header, "step": done, "best": best.as_dict(), "saved_at": time.time()},
            best=as_best,
        )
        return state

    throughput = _Throughput()
    done = start
    metrics: Mapping[str, Any] | None = None
    run_steps = 0
    try:
        for s in range(start, total):
            batch = get_batch(s)
            key = jr.fold_in(base_key, s)
            if run_steps == 0:
                say("compiling...")
                t_first = time.perf_counter()
            new_state, new_metrics = train_step(state, batch, key)
            state, metrics, done = new_state, new_metrics, s + 1
            run_steps += 1
            bar.update(1)

            # Steps 1-2 compile (and possibly re-trace): sync, time them separately.
            if run_steps <= 2:
                if "loss" not in metrics:
                    raise KeyError(
                        f"train_step's metrics must include 'loss'; got {sorted(metrics)}"
                    )
                jax.block_until_ready(eqx.filter((state, metrics), eqx.is_array))
                if run_steps == 1:
                    say(
                        f"first step done in {time.perf_counter() - t_first:.1f}s "
                        "(includes compilation)"
                    )
                else:
                    throughput.start()
            else:
                throughput.tick()

            is_last = done == total
            log_now = done % spec.log_every == 0 or is_last
            eval_now = evaluate is not None and (done % spec.eval_every == 0 or is_last)
            save_now = done % spec.checkpoint_every == 0 or is_last

            if log_now:
                values = {k: to_python(v) for k, v in jax.device_get(dict(metrics)).items()}
                seconds = throughput.read()
                if seconds is not None:
                    values["ms_per_step"] = 1e3 * seconds
                    values[rate_key] = units_per_step / seconds
                logger.log(done, "train", **values)
                shown = {"loss": _short(values["loss"])}
                if rate_key in values:
                    shown[f"{unit_name}/s"] = _rate(values[rate_key])
                shown.update({k: _short(values[k]) for k in _POSTFIX_KEYS if k in values})
                if progress:
                    bar.set_postfix(shown, refresh=False)
                else:
                    extra = (
                        f" | {values['ms_per_step']:.1f} ms/step" if "ms_per_step" in values else ""
                    )
                    say(
                        f"step {done}/{total} | "
                        + " | ".join(f"{k} {v}" for k, v in shown.items())
                        + extra
                    )
                if not is_finite_number(values["loss"]):
                    raise NonFiniteLossError(
                        _nonfinite_message(f"loss is {values['loss']}", done, last_saved, manager)
                    )

            improved = False
            if eval_now:
                assert evaluate is not None
                state = _with_step(state, done)
                t_eval = time.perf_counter()
                results = {k: to_python(v) for k, v in evaluate(state).items()}
                if best_key not in results:
                    raise KeyError(
                        f"evaluate() returned {sorted(results)}, which lacks best_key={best_key!r}"
                    )
                eval_seconds = time.perf_counter() - t_eval
                logger.log(done, "val", **results, eval_seconds=eval_seconds)
                improved = best.improves(results[best_key])
                if improved:
                    best.value, best.step = float(results[best_key]), done
                say(
                    f"val step {done}: "
                    + ", ".join(f"{k} {_short(v)}" for k, v in results.items())
                    + (f"  (best {best_key})" if improved else "")
                )

            if save_now or improved:
                state = save(state, done, metrics, as_best=improved)
                last_saved = done
            if eval_now or save_now:
                throughput.restart_if_running()
    except KeyboardInterrupt:
        bar.close()
        if done == start or done == last_saved:
            print(
                f"\ninterrupted at step {done}; {manager.latest_file} already holds it"
                if last_saved == done
                else f"\ninterrupted at step {done}; nothing to save"
            )
        else:
            try:
                save(state, done, metrics, as_best=False)
                print(
                    f"\ninterrupted: saved step {done} to {manager.latest_file}; "
                    "continue with resume=True"
                )
            except NonFiniteLossError as e:
                print(f"\ninterrupted at step {done}; not saved: {e}")
        raise
    finally:
        bar.close()

    state = _with_step(state, done)
    summary = f"finished step {done}"
    if best.value is not None:
        summary += f"; best val {best_key} {_short(best.value)} at step {best.step}"
    print(summary + f"; checkpoints in {workdir}")
    return state


def _nonfinite_message(
    what: str, step: int, last_saved: int | None, manager: CheckpointManager
) -> str:
    if last_saved is not None:
        kept = f"{manager.latest_file} still holds step {last_saved}"
    elif manager.latest_path() is not None:
        kept = f"{manager.latest_file} was left as it was"
    else:
        kept = "no checkpoint was written"
    return (
        f"{what} at step {step}; stopped without saving this state ({kept}). "
        "Try a lower learning rate, gradient clipping (clip_norm), "
        "or a more stable solver."
    )
