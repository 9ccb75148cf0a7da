"""Experiment configs: frozen dataclasses, `--key=value` overrides, JSON, and validation.

Each experiment lists every knob in one frozen `@dataclass Config` (nanoGPT's habit of
one visible default per setting) with a registry of named instances. The field types are
the vocabulary understood here: `int`, `float`, `str`, `bool`, `tuple[int, ...]`,
`Literal[...]` and `X | None`. Both experiments use the same names for the same knobs.

`validate` checks every value (its type, then the ranges in `RULES`, then the relations
in `_CROSS_CHECKS`) and raises `ConfigError` with one line naming the field, the value and
the fix. The training CLIs call it before they touch data, devices or files.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar


C = TypeVar("C")


class ConfigError(ValueError):
    """A config value or command-line argument that cannot work; one line, says the fix."""


# --------------------------------------------------------------------------------------
# Types of config fields
# --------------------------------------------------------------------------------------


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation, in definition order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _options(tp: Any) -> tuple[Any, ...]:
    """The members of a union (`X | None`), or `(tp,)`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"comma-separated {typing.get_args(tp)[0].__name__}s"
    names = [_type_name(t) for t in _options(tp)] if len(_options(tp)) > 1 else None
    return " or ".join(names) if names else getattr(tp, "__name__", str(tp))


def _matches(tp: Any, value: Any) -> bool:
    """Whether `value` is a valid value of the config field type `tp`."""
    for option in _options(tp):
        origin = typing.get_origin(option)
        if option is type(None) and value is None:
            return True
        if origin is typing.Literal and value in typing.get_args(option):
            return True
        if origin is tuple and isinstance(value, tuple):
            (item,) = typing.get_args(option)[:1]
            if all(_matches(item, v) for v in value):
                return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option in (int, str, bool) and type(value) is option:
            return True
    return False


def _from_text(tp: Any, text: str) -> Any:
    """The command-line string `text` as a value of type `tp`; `ValueError` if it is not one."""
    for option in _options(tp):
        origin = typing.get_origin(option)
        try:
            if option is type(None) and text.lower() in ("none", "null"):
                return None
            if origin is typing.Literal:
                (value,) = [a for a in typing.get_args(option) if str(a) == text]
                return value
            if origin is tuple:
                (item,) = typing.get_args(option)[:1]
                return tuple(_from_text(item, t.strip()) for t in text.split(",") if t.strip())
            if option is bool and text.lower() in ("true", "1", "yes", "false", "0", "no"):
                return text.lower() in ("true", "1", "yes")
            if option is int:
                value = float(text)  # accepts 1e3
                if value.is_integer():
                    return int(value)
            if option is float:
                return float(text)
            if option is str:
                return text
        except ValueError:
            continue
    raise ValueError(text)


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
    """Inverse of `to_dict`; missing fields take their defaults. **Raises:** `ConfigError`
    for unknown fields; values are not checked here (call `validate`)."""
    types_ = field_types(cls)
    unknown = [k for k in values if k not in types_]
    if unknown:
        raise ConfigError(f"unknown config field {unknown[0]!r}{_did_you_mean(unknown[0], types_)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def apply_overrides(config: C, pairs: Mapping[str, str | None]) -> tuple[C, dict[str, Any]]:
    """`config` with each `key -> text` converted to its field's type (`None` text: a bare
    `--flag`, true). Returns `(new config, {key: value})`. **Raises:** `ConfigError`."""
    types_ = field_types(type(config))
    values: dict[str, Any] = {}
    for key, text in pairs.items():
        if key not in types_:
            raise ConfigError(
                f"unknown option --{key}{_did_you_mean(key, types_)} (--help lists them)"
            )
        tp = types_[key]
        if text is None:
            if bool not in _options(tp):
                raise ConfigError(f"--{key} needs a value: --{key}=<{_type_name(tp)}>")
            values[key] = True
            continue
        try:
            values[key] = _from_text(tp, text)
        except ValueError:
            raise ConfigError(f"--{key}={text}: expected {_type_name(tp)}") from None
    return dataclasses.replace(config, **values), values  # pyright: ignore


def split_args(argv: typing.Sequence[str]) -> dict[str, str | None]:
    """`["--lr=1e-3", "--resume", "--data-dir=x"]` -> `{"lr": "1e-3", "resume": None,
    "data_dir": "x"}` (dashes in keys read as underscores; `-h` is `help`)."""
    pairs: dict[str, str | None] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            pairs["help"] = None
            continue
        if not arg.startswith("--") or arg[2:3] in ("", "="):
            raise ConfigError(f"unexpected argument {arg!r}: expected --key=value")
        key, sep, value = arg[2:].partition("=")
        pairs[key.replace("-", "_")] = value if sep else None
    return pairs


def from_args(argv: typing.Sequence[str], configs: Mapping[str, C], default: str) -> C:
    """The config named by `--config=NAME` (else `default`) with the other `--key=value`
    overrides applied, validated. **Raises:** `ConfigError`."""
    pairs = split_args(argv)
    name = pairs.pop("config", None) or default
    if name not in configs:
        raise ConfigError(f"--config={name}: unknown; choose from {', '.join(configs)}")
    config, _ = apply_overrides(configs[name], pairs)
    validate(config)
    return config


def describe(config: Any) -> str:
    """One `name = value` line per field, for `--help`."""
    width = max(len(f.name) for f in dataclasses.fields(config))
    return "\n".join(
        f"  --{f.name:<{width}} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config)
    )


# --------------------------------------------------------------------------------------
# Validation: one table for both experiments
# --------------------------------------------------------------------------------------


def _positive(v: Any) -> bool:
    return all(x > 0 for x in (v if isinstance(v, tuple) else (v,)))


def _nonnegative(v: Any) -> bool:
    return all(x >= 0 for x in (v if isinstance(v, tuple) else (v,)))


def _unit(v: float) -> bool:  # a probability or fraction in [0, 1)
    return 0 <= v < 1


def _existing_dir(v: str | None) -> bool:
    return v is None or v == "" or os.path.exists(os.path.expanduser(v))


# field -> (check, what a good value is). Fields a config does not have are skipped; None
# values of optional fields are accepted unless the check says otherwise.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # optimisation
    "lr": (lambda v: v > 0 and math.isfinite(v), "must be a positive learning rate, e.g. 3e-4"),
    "min_lr": (_nonnegative, "must be >= 0"),
    "weight_decay": (_nonnegative, "must be >= 0, e.g. 0.1"),
    "grad_clip": (_nonnegative, "must be >= 0 (0 turns clipping off), e.g. 1.0"),
    "warmup_steps": (_nonnegative, "must be >= 0"),
    "train_steps": (_positive, "must be >= 1"),
    "epochs": (_nonnegative, "must be >= 0 (0: train_steps decides), e.g. 40"),
    "batch_size": (_positive, "must be >= 1"),
    "eval_batch_size": (_positive, "must be >= 1"),
    "jac_reg": (
        lambda v: v >= 0 and math.isfinite(v),
        "must be >= 0 (0 turns Jacobian regularisation off), e.g. 1.9",
    ),
    "jac_reg_probes": (_positive, "must be >= 1"),
    "plateau_factor": (lambda v: 0 < v < 1, "must lie in (0, 1), e.g. 0.5"),
    "plateau_patience": (_positive, "must be >= 1"),
    "plateau_window": (_positive, "must be >= 1"),
    # loop
    "log_every": (_positive, "must be >= 1"),
    "eval_every": (_positive, "must be >= 1"),
    "checkpoint_every": (_positive, "must be >= 1"),
    "seed": (_nonnegative, "must be >= 0"),
    # solver
    "beta": (lambda v: 0 < v < 2 and v != 1, "must lie in (0, 2) and not be 1, e.g. 0.5"),
    "max_steps": (_positive, "must be >= 1 (solver steps)"),
    "tol": (_nonnegative, "must be >= 0, e.g. 1e-3"),
    "anderson_m": (_positive, "must be >= 1"),
    "implicit_tol": (_positive, "must be > 0, e.g. 1e-6"),
    "implicit_max_steps": (_positive, "must be >= 1"),
    "sweep_steps": (_nonnegative, "must be solver step counts >= 0, e.g. 1,2,4,8"),
    # model
    "dim": (_positive, "must be >= 1"),
    "num_heads": (_positive, "must be >= 1"),
    "mlp_ratio": (_positive, "must be >= 1"),
    "seq_len": (_positive, "must be >= 1"),
    "num_layers": (_positive, "must be >= 1"),
    "dropout": (_unit, "must lie in [0, 1), e.g. 0.1"),
    "channels": (lambda v: len(v) >= 1 and _positive(v), "must be one or more positive ints"),
    "width": (lambda v: len(v) >= 1 and _positive(v), "must be one or more positive ints"),
    "bn_momentum": (_unit, "must lie in [0, 1), e.g. 0.9"),
    "resnet_width": (_positive, "must be >= 1"),
    "ode_augment": (_nonnegative, "must be >= 0"),
    "ode_hidden": (_positive, "must be >= 1"),
    "ode_steps": (_nonnegative, "must be >= 0 (0: adaptive)"),
    # data
    "holdout_fraction": (lambda v: 0 < v < 1, "must lie in (0, 1), e.g. 0.1"),
    "eval_tokens": (lambda v: v is None or v > 0, "must be >= 1, or none for all"),
    "test_tokens": (lambda v: v is None or v > 0, "must be >= 1, or none for all"),
    "train_size": (_nonnegative, "must be >= 0 (0: all)"),
    "test_size": (_nonnegative, "must be >= 0 (0: all)"),
    "data_dir": (_existing_dir, "does not exist; give an existing directory"),
    "tokenizer_dir": (_existing_dir, "does not exist; give an existing directory"),
}


# Values of `model` (in either experiment) that hold a fixed-point solve.
_DEQ_MODELS = ("deq", "implicit-resnet", "single-scale")


def _cross_checks(c: Any) -> typing.Iterator[str]:
    """Relations between fields, each a one-line message when broken."""
    has = lambda *names: all(hasattr(c, n) for n in names)
    if has("dim", "num_heads") and c.dim % c.num_heads:
        yield (
            f"--dim={c.dim} is not divisible by --num_heads={c.num_heads}; "
            f"use a multiple of {c.num_heads}, e.g. --dim={c.num_heads * max(1, c.dim // c.num_heads)}"
        )
    if has("warmup_steps", "train_steps") and c.warmup_steps > c.train_steps:
        yield (
            f"--warmup_steps={c.warmup_steps} exceeds --train_steps={c.train_steps}; "
            "warm up for at most train_steps"
        )
    if has("adjoint", "solver") and c.adjoint == "reversible" and c.solver != "reversible":
        yield (
            f"--adjoint=reversible needs --solver=reversible, got --solver={c.solver}; "
            "use --adjoint=implicit (classic DEQ) or --adjoint=unrolled with that solver"
        )
    if has("channels", "width", "max_steps") and not (
        len(c.channels) == len(c.width) == len(c.max_steps)
    ):
        yield (
            f"--channels, --width and --max_steps need one entry per scale, got "
            f"{len(c.channels)}, {len(c.width)} and {len(c.max_steps)} entries"
        )
    if has("jac_reg", "model") and c.jac_reg > 0 and c.model not in _DEQ_MODELS:
        deq = "deq" if c.model == "explicit" else "implicit-resnet or single-scale"
        yield (
            f"--jac_reg={c.jac_reg} needs a DEQ model (the penalty is taken at its fixed "
            f"point), got --model={c.model}; use --model={deq}, or --jac_reg=0"
        )
    if has("min_lr", "lr") and c.min_lr > c.lr:
        yield f"--min_lr={c.min_lr} exceeds --lr={c.lr}; use a smaller --min_lr"


def validate(config: Any) -> None:
    """Check every field of `config`. **Raises:** `ConfigError`, one line, on the first
    problem: a value of the wrong type, out of range, or inconsistent with another."""
    for name, tp in field_types(type(config)).items():
        value = getattr(config, name)
        if not _matches(tp, value):
            raise ConfigError(f"--{name}={value!r} is not valid: expected {_type_name(tp)}")
        if name in RULES and value is not None:
            check, what = RULES[name]
            if not check(value):
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
                raise ConfigError(f"--{name}={shown}: {what}")
    for problem in _cross_checks(config):
        raise ConfigError(problem)
