"""Evaluate a trained CIFAR-10 run on the test split.

    python -m experiments.vision.evaluate --workdir=runs/cifar-small
    python -m experiments.vision.evaluate --workdir=runs/cifar-small --checkpoint=best --test-size=0
    python -m experiments.vision.evaluate --workdir=runs/cifar-small --max-steps=8   # more solver steps
    python -m experiments.vision.evaluate --workdir=runs/cifar-small --sweep-steps=1,2,4,8  # acc vs NFE

Rebuilds the model from the checkpoint's header (its config), loads the weights and BatchNorm
statistics, and reports test loss, accuracy and mean NFE with BatchNorm in inference mode.
The result is printed and written to `<workdir>/eval_<checkpoint>.json`.

`--sweep-steps=1,2,...` also evaluates the same weights with every DEQ block capped at each of
those solver step counts, with ONE compiled evaluation step: every block is built with the largest
count as its `max_steps` ceiling and each count is a traced `step_budget`, which gives the numbers
of `--max-steps` set to it (a block never runs past its own ceiling).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp

import revdeq_jax as rdeq
from experiments.common import config as cfg
from experiments.common.checkpoint import load_checkpoint, read_header
from experiments.common.optim import count_params

from . import data as vdata
from .configs import Config
from .train import evaluate, init_state


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    workdir: str = ""  # run folder written by experiments.vision.train (required)
    checkpoint: Literal["latest", "best"] = "best"  # best: highest validation accuracy
    data_dir: str | None = None  # None = the run's own data source
    test_size: int = -1  # -1 = as in the run's config; 0 = the whole test split
    max_steps: int = 0  # > 0: override every DEQ block's solver step budget
    sweep_steps: tuple[int, ...] = ()  # also evaluate with every block capped at each count
    batch_size: int = 0  # 0 = the run's eval_batch_size


def load_run(workdir: str | pathlib.Path, checkpoint: str = "latest") -> tuple[Config, Any, dict]:
    """`(config, state, header)` of a run's `latest.eqx`/`best.eqx`."""
    path = pathlib.Path(workdir) / f"{checkpoint}.eqx"
    if not path.is_file():
        raise FileNotFoundError(
            f"no {checkpoint}.eqx in {workdir}: train first with "
            f"`python -m experiments.vision.train --workdir={workdir}`."
        )
    config = cfg.from_dict(Config, read_header(path)["config"])
    skeleton = eqx.filter_eval_shape(init_state, config)
    state, header = load_checkpoint(path, skeleton)
    return config, state, header


def _deqs(model: Any) -> list[rdeq.DEQ]:
    is_deq = lambda m: isinstance(m, rdeq.DEQ)
    return [d for d in jax.tree.leaves(model, is_leaf=is_deq) if is_deq(d)]


def _with_max_steps(model: Any, max_steps: int) -> Any:
    """Replace the step budget of every `revdeq_jax.DEQ` inside `model`."""
    deqs = _deqs(model)
    if not deqs:
        raise ValueError("`max_steps` given, but this model has no DEQ blocks.")
    return eqx.tree_at(_deqs, model, [dataclasses.replace(d, max_steps=max_steps) for d in deqs])


def nfe_sweep(
    model: Any, bn_state: Any, images, labels, batch_size: int, steps: Sequence[int]
) -> list[dict[str, Any]]:
    """Loss, accuracy and NFE with every DEQ block capped at each step count in `steps`,
    from one compiled `eval_step` (the count is a traced int32 scalar). Each block runs at
    most `min(count, its max_steps)` steps: build `model` with `max(steps)` as every
    block's `max_steps` to get the numbers of `_with_max_steps(model, count)`."""
    if not _deqs(model):
        raise ValueError("`sweep_steps` given, but this model has no DEQ blocks.")
    return [
        {"max_steps": s}
        | evaluate(model, bn_state, images, labels, batch_size, jnp.asarray(s, jnp.int32))
        for s in steps
    ]


def evaluate_workdir(
    workdir: str | pathlib.Path,
    *,
    checkpoint: str = "best",
    dataset: vdata.CIFAR10 | None = None,
    data_dir: str | None = None,
    test_size: int = -1,
    max_steps: int = 0,
    batch_size: int = 0,
    sweep_steps: Sequence[int] = (),
) -> dict[str, Any]:
    config, state, header = load_run(workdir, checkpoint)
    if dataset is None:
        dataset = vdata.load_cifar10(data_dir or config.data_dir, download=config.download)
    n_test = config.test_size if test_size < 0 else test_size
    dataset = dataset.take(None, n_test or None)
    model = state.model if max_steps <= 0 else _with_max_steps(state.model, max_steps)
    batch_size = batch_size or config.eval_batch_size
    result = evaluate(model, state.model_state, dataset.x_test, dataset.y_test, batch_size)
    if sweep_steps:
        ceiling = _with_max_steps(model, max(sweep_steps))
        result["sweep"] = nfe_sweep(
            ceiling, state.model_state, dataset.x_test, dataset.y_test, batch_size, sweep_steps
        )
    result.update(
        step=int(header.get("step", 0)),
        checkpoint=checkpoint,
        test_images=len(dataset.x_test),
        params=count_params(model),
        max_steps=max_steps or None,
    )
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs = {}
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        pairs[key.replace("-", "_")] = value
    try:
        args, _ = cfg.apply_overrides(EvalConfig(), pairs)
        cfg.validate(args)
    except cfg.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if not args.workdir:
        raise SystemExit("--workdir=RUN_FOLDER is required (a folder written by the train script)")
    result = evaluate_workdir(**dataclasses.asdict(args))  # EvalConfig's fields are its args
    out = pathlib.Path(args.workdir) / f"eval_{args.checkpoint}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.workdir} ({args.checkpoint}, step {result['step']}): test acc "
        f"{100 * result['acc']:.2f}% on {result['test_images']} images, loss {result['loss']:.4f}"
        + (f", NFE {result['nfe']:.1f}" if "nfe" in result else "")
        + f"  -> {out}"
    )
    for row in result.get("sweep", []):
        print(
            f"  at most {row['max_steps']} steps per block: NFE {row['nfe']:.1f}, test acc "
            f"{100 * row['acc']:.2f}%, loss {row['loss']:.4f}"
        )
    return result


if __name__ == "__main__":
    main()
