"""Experiment configuration: frozen dataclasses, strict `--key=value` overrides, JSON.

An experiment defines one frozen `@dataclass Config` that lists every knob with its
default, plus a registry of named instances (`"tiny"`, `"small"`, `"paper"`, ...).
`parse_config` picks one with `--config=NAME` and applies command-line overrides,
converting each string to the field's type and rejecting unknown keys, as nanoGPT's
`configurator.py` does, minus its `exec` into `globals()`.

```python
@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4            # peak learning rate
    steps: int = 1000           # optimiser steps
    widths: tuple[int, ...] = (64, 128)
    resume: bool = False

CONFIGS = {"tiny": Config(steps=20), "small": Config()}
argv = ["--config=tiny", "--lr=1e-3", "--widths=32,64", "--resume"]
config, overrides = parse_config(CONFIGS, argv, default="small")
```
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import pathlib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar


ConfigT = TypeVar("ConfigT")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_NONE = frozenset({"none", "null"})
_HELP = frozenset({"--help", "-h"})


# --------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------


def _check_dataclass_type(cls: Any) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")


def _field_types(cls: type, *, init_only: bool = True) -> dict[str, Any]:
    """Resolved type of every (init) field of dataclass `cls`, in definition order."""
    _check_dataclass_type(cls)
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init or not init_only
    }


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return str(tp).replace("typing.", "")


def _accepts_bool(tp: Any) -> bool:
    if tp is bool:
        return True
    return _is_union(tp) and bool in typing.get_args(tp)


def _suggestion(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------------------
# Parsing command-line strings
# --------------------------------------------------------------------------------------


def _parse_int(text: str) -> int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    value = float(text)  # "1e3" -> 1000; raises ValueError on junk
    if not value.is_integer():
        raise ValueError(f"{text!r} is not an integer")
    return int(value)


def _parse_value(tp: Any, text: str) -> Any:
    """Convert the command-line string `text` to `tp`; `ValueError` if impossible."""
    if tp is Any:
        return text
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) < len(args) and text.strip().lower() in _NONE:
            return None
        for arg in non_none:
            try:
                return _parse_value(arg, text)
            except ValueError:
                continue
        raise ValueError()
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text.strip():
                return choice
        raise ValueError()
    if origin in (tuple, list) or tp in (tuple, list):
        body = text.strip()
        if body[:1] in "([" and body[-1:] in ")]":
            body = body[1:-1]
        items = [] if body.strip() == "" else [item.strip() for item in body.split(",")]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_types: list[Any] = [args[0]] * len(items)
        elif origin is tuple and args and args != ((),):
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated items, got {len(items)}")
            item_types = list(args)
        elif origin is list and args:
            item_types = [args[0]] * len(items)
        else:
            item_types = [str] * len(items)
        values = [_parse_value(t, item) for t, item in zip(item_types, items)]
        return list(values) if (origin is list or tp is list) else tuple(values)
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("use true/false/1/0")
    if tp is int:
        return _parse_int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        return tp(text)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if text.strip() in (member.name, str(member.value)):
                return member
        raise ValueError()
    raise TypeError(f"config fields of type {_type_name(tp)} cannot be set from the command line")


def format_config(config: Any) -> str:
    """One `name = value  (type)` line per field of the dataclass instance `config`."""
    hints = _field_types(type(config), init_only=False)
    width = max((len(name) for name in hints), default=0)
    return "\n".join(
        f"  {name:<{width}} = {getattr(config, name)!r}  ({_type_name(tp)})"
        for name, tp in hints.items()
    )


def parse_config(
    registry: Mapping[str, ConfigT], argv: Sequence[str] | None = None, *, default: str
) -> tuple[ConfigT, dict[str, Any]]:
    """Pick a named config and apply `--key=value` overrides from the command line.

    **Arguments:**

    - `registry`: name -> frozen dataclass instance (all of the same class).
    - `argv`: arguments such as `["--config=small", "--lr=1e-3", "--widths=1,2,3",
        "--resume"]`; defaults to `sys.argv[1:]`. `--config=NAME` selects the base
        config; every other `--key=value` replaces a dataclass field, converted to the
        field's type: `int` (also `1e3`), `float`, `str`, `bool`
        (`true/false/1/0/yes/no`), `tuple[int, ...]` as `1,2,3`, `X | None` accepting
        `none`, `Literal[...]`, `Path`. A bare `--flag` sets a bool field to `True`.
        Dashes in keys read as underscores (`--log-every=10`). `--help` prints the
        fields of the selected config and exits.
    - `default`: the registry name used when no `--config` is given.

    **Returns:**

    `(config, overrides)`: the new frozen config and a dict of the converted overridden
    values.

    **Raises:**

    `ValueError` for an unknown config name, an unknown key (listing the valid ones,
    with a close-match suggestion), a value that does not convert, or a malformed
    argument.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if default not in registry:
        raise ValueError(f"default config {default!r} is not in the registry {sorted(registry)}")
    name = default
    pairs: list[tuple[str, str | None]] = []
    want_help = False
    for arg in argv:
        if arg in _HELP:
            want_help = True
            continue
        if not arg.startswith("--") or len(arg) == 2 or arg[2] == "=":
            raise ValueError(f"unexpected argument {arg!r}: expected --key=value or --flag")
        key, sep, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "config":
            if not sep or not value:
                raise ValueError(f"--config needs a name: one of {sorted(registry)}")
            name = value
        else:
            pairs.append((key, value if sep else None))
    if name not in registry:
        raise ValueError(
            f"unknown config {name!r}; choose from {sorted(registry)}."
            + _suggestion(name, list(registry))
        )
    base = registry[name]
    if not dataclasses.is_dataclass(base) or isinstance(base, type):
        raise TypeError(f"registry[{name!r}] must be a dataclass instance, got {base!r}")
    if want_help:
        print(
            f"config {name!r} (choose with --config=NAME from {sorted(registry)}); "
            "override with --key=value:"
        )
        print(format_config(base))
        raise SystemExit(0)
    field_types = _field_types(type(base))
    overrides: dict[str, Any] = {}
    for key, text in pairs:
        if key not in field_types:
            raise ValueError(
                f"unknown config key {key!r}.{_suggestion(key, list(field_types))} "
                f"Valid keys: {', '.join(field_types)}."
            )
        tp = field_types[key]
        if text is None:
            if not _accepts_bool(tp):
                raise ValueError(f"--{key} needs a value: --{key}=<{_type_name(tp)}>")
            overrides[key] = True
            continue
        try:
            overrides[key] = _parse_value(tp, text)
        except ValueError as e:
            detail = f" ({e})" if str(e) else ""
            raise ValueError(
                f"bad value {text!r} for --{key}: expected {_type_name(tp)}{detail}"
            ) from None
    config = dataclasses.replace(base, **overrides)  # pyright: ignore[reportArgumentType]
    for key, value in overrides.items():
        print(f"override {key} = {value!r} (was {getattr(base, key)!r})")
    return config, overrides


# --------------------------------------------------------------------------------------
# JSON round trip
# --------------------------------------------------------------------------------------


def _to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return _to_json(value.value, where)
    raise TypeError(
        f"config field {where} = {value!r} ({type(value).__name__}) is not JSON-serialisable"
    )


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-safe dict of a dataclass instance.

    Tuples become lists, paths strings, nested dataclasses dicts.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance, got {config!r}")
    return {f.name: _to_json(getattr(config, f.name), f.name) for f in dataclasses.fields(config)}


def _from_json(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_json(arg, value, where)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list for {_type_name(tp)}, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args and args != ((),):
            if len(value) != len(args):
                raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_from_json(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(args, value))]
        elif origin is list and args:
            items = [_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return items if (origin is list or tp is list) else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a dict, got {value!r}")
        if len(args) == 2:
            return {k: _from_json(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a dict for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected str, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        return tp(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    return value


def config_from_dict(cls: type[ConfigT], d: Mapping[str, Any]) -> ConfigT:
    """Inverse of `config_to_dict`: rebuild a `cls` (tuples, paths, ...).

    Missing keys take the dataclass defaults (so older checkpoints load after a field is
    added); unknown keys raise `ValueError`; fields declared with `init=False` are
    recomputed, not read.
    """
    init_types = _field_types(cls)
    all_names = set(_field_types(cls, init_only=False))
    unknown = [k for k in d if k not in all_names]
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} for {cls.__name__}."
            f"{_suggestion(unknown[0], list(all_names))} "
            f"Valid keys: {', '.join(init_types)}."
        )
    kwargs = {k: _from_json(init_types[k], v, k) for k, v in d.items() if k in init_types}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"cannot build {cls.__name__} from {dict(d)!r}: {e}") from e
