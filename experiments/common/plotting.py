"""PNG plots of training curves, drawn on Matplotlib's Agg canvas (no pyplot).

```python
plot_metrics("runs/x/metrics.jsonl", "runs/x/curves.png",
             panels={"loss": [("train", "loss"), ("val", "loss")],
                     "perplexity": [("val", "ppl")]})
plot_series({"RevDEQ": (steps, losses)}, "loss.png",
            xlabel="step", ylabel="loss", title="...")
```

Figures are built as `matplotlib.figure.Figure` objects on a `FigureCanvasAgg`, so
nothing touches pyplot's global state or the configured backend.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import read_metrics


PathLike = str | os.PathLike[str]


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def _finite_or_nan(values: Sequence[float]) -> list[float]:
    out = []
    for v in values:
        v = float(v)
        out.append(v if math.isfinite(v) else math.nan)
    return out


def _save(fig: Figure, out_png: PathLike) -> pathlib.Path:
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=120)
    return out


def metric_series(
    records: Sequence[Mapping[str, object]], split: str, key: str, *, x: str = "step"
) -> tuple[list[float], list[float]]:
    """`(xs, ys)` of `key` in records of `split`, sorted by `x`; a repeated `x` keeps
    the last record (a resumed run overrides the crashed one)."""
    points: dict[float, float] = {}
    for record in records:
        if record.get("split") != split:
            continue
        xv, yv = record.get(x), record.get(key)
        if (
            isinstance(xv, (int, float))
            and isinstance(yv, (int, float))
            and not isinstance(yv, bool)
        ):
            points[float(xv)] = float(yv)
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def plot_metrics(
    metrics_path: PathLike,
    out_png: PathLike,
    *,
    x: str = "step",
    panels: Mapping[str, Sequence[tuple[str, str]]],
) -> pathlib.Path:
    """One panel per entry of `panels`, plotting `(split, key)` series.

    **Arguments:**

    - `metrics_path`: a `metrics.jsonl` file (or a work directory holding one).
    - `out_png`: where to write the PNG (parent directories are created).
    - `x`: the record field for the horizontal axis (`"step"`, `"time"`, ...).
    - `panels`: title -> list of `(split, key)`, e.g. `{"loss": [("train", "loss"),
        ("val", "loss")], "perplexity": [("val", "ppl")]}`. A panel whose series have no
        data yet says so instead of failing.

    **Returns:** the path of the PNG.
    """
    if not panels:
        raise ValueError("`panels` is empty: give at least one title -> [(split, key), ...]")
    records = read_metrics(metrics_path)
    rows, cols = _grid(len(panels))
    fig = Figure(figsize=(4.5 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, series) in zip(axes, panels.items()):
        drawn = 0
        for split, key in series:
            xs, ys = metric_series(records, split, key, x=x)
            if not xs:
                continue
            ys = _finite_or_nan(ys)
            ax.plot(
                xs,
                ys,
                label=f"{split} {key}",
                marker="o" if len(xs) <= 20 else None,
                markersize=3,
            )
            drawn += 1
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(
                0.5,
                0.5,
                "no data yet",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, out_png)


def plot_series(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    out_png: PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    logx: bool = False,
) -> pathlib.Path:
    """One axes with a line per entry of `series` (label -> `(xs, ys)`). More than four
    series get their legend below the axes, where it hides no data.

    With `logy=True` (`logx=True`), non-positive y (x) values raise `ValueError` (they have
    no logarithm).
    """
    if not series:
        raise ValueError("`series` is empty")
    below = len(series) > 4
    fig = Figure(figsize=(6.0, 4.0 + (0.2 * len(series) if below else 0.0)), layout="constrained")
    ax = fig.subplots()
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {label!r}: {len(xs)} x values but {len(ys)} y values")
        ys = _finite_or_nan(ys)
        if logy and any(y <= 0 for y in ys if not math.isnan(y)):
            raise ValueError(
                f"series {label!r} has values <= 0, which a log-scale axis cannot show"
            )
        if logx and any(x <= 0 for x in _finite_or_nan(xs) if not math.isnan(x)):
            raise ValueError(
                f"series {label!r} has x values <= 0, which a log-scale axis cannot show"
            )
        ax.plot(
            list(xs),
            ys,
            label=label,
            marker="o" if len(xs) <= 20 else None,
            markersize=3,
        )
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if below:
        fig.legend(loc="outside lower center", fontsize="x-small", ncols=1)
    else:
        ax.legend(fontsize="small")
    return _save(fig, out_png)
