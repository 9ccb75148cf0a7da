"""CI smoke of `make reproduce-wikitext` / `make reproduce-cifar`: the same pipelines
(`compare.main`) on tiny configs for a few steps, into a tmp dir; a second invocation skips
the finished runs and reuses the plan."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest

from experiments.common import reproduce as rep
from tests.experiments.test_language import needs_data, WIKITEXT


ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_run_status_and_plan(tmp_path):
    run = tmp_path / "run"
    assert rep.run_status(run) == "new"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert rep.run_status(run) == "partial"
    (run / "results.json").write_text("{}")
    assert rep.run_status(run) == "done"
    made = []
    plan = rep.load_plan(tmp_path / "plan.json", 5.0, lambda: made.append(1) or {"train_steps": 7})
    again = rep.load_plan(tmp_path / "plan.json", 5.0, lambda: made.append(1) or {})
    assert plan == again == {"budget_min": 5.0, "train_steps": 7} and made == [1]
    with pytest.raises(rep.ReproduceError, match="--budget_min=5"):
        rep.load_plan(tmp_path / "plan.json", 6.0, dict)
    # 2 seeds of models at 1 s and 2 s per step in 1 minute, a quarter kept for the rest
    assert rep.steps_for_budget(1.0, [1.0, 2.0], 2, minimum=1) == 7


def test_make_reproduce_cifar_flags_plan_from_the_budget():
    """The flags `make reproduce-cifar` passes (read from the Makefile) parse, and leave the
    step count to the budget: a `train_steps` default the config rules refused once made
    the target exit before training anything."""
    from experiments.vision import compare

    recipe = (ROOT / "Makefile").read_text().split("reproduce-cifar: $(STAMP)")[1]
    line = " ".join(recipe.split("\n\n")[0].replace("\\\n", " ").split())
    flags = [f for f in line.split() if f.startswith("--") and "$(DATA_FLAG)" not in f]
    values = {"$(BUDGET_MIN)": "90", "$(SEEDS)": "0,1", "$(RUNS)": "runs"}
    for make_var, value in values.items():
        flags = [f.replace(make_var, value) for f in flags]
    options = compare.parse_options(flags)
    assert options.train_steps is None and options.budget_min == 90.0
    assert options.seeds == (0, 1) and options.base == "repro"
    with pytest.raises(SystemExit, match="train_steps"):
        compare.parse_options(["--train-steps=0"])


def test_at_time_and_spread():
    curve = [(10, 1.0, 50.0), (20, 2.0, 40.0), (30, 3.0, 45.0)]
    assert rep.at_time(curve, 2.5, min) == (20, 40.0)
    assert rep.at_time(curve, 0.5, min) is None
    s = rep.spread([1.0, 3.0, None])
    assert s == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 2}
    assert rep.fmt_spread(s, ".1f") == "2.0 (1.0–3.0)" and rep.fmt_spread(None, ".1f") == "-"


def test_matched_seconds_never_leaves_a_model_out():
    """The matched-time view's window: the fastest model's mean training time when every
    run has been validated by then; otherwise the latest first validation, so that no
    model's value is missing (the first CIFAR comparison's table was empty for the
    implicit models: ResNet-18 had finished in 18 s, before their first validation)."""
    run = lambda seconds, curve: {"train_seconds": seconds, "curve": curve}
    similar = [
        [run(100.0, [(5, 20.0, 1.0), (10, 100.0, 0.5)])],
        [run(140.0, [(5, 30.0, 1.0), (10, 140.0, 0.5)]), run(160.0, [(5, 35.0, 0.9)])],
    ]
    assert rep.matched_seconds(similar) == 100.0
    fast_one = [
        [run(18.0, [(99, 18.0, 0.3)])],
        [run(900.0, [(27, 250.0, 0.2), (99, 900.0, 0.3)]), run(950.0, [(27, 260.0, 0.2)])],
    ]
    seconds = rep.matched_seconds(fast_one)
    assert seconds == 260.0
    assert all(rep.at_time(r["curve"], seconds, max) for runs in fast_one for r in runs)


def test_val_curve_times_validations_between_logged_steps():
    """Validation every 24 steps, train records every 10 (the vision runs): a validation
    gets the training time interpolated between the logged steps around it."""
    records = [
        {"split": "train", "step": 10},  # compilation: charged at the first measured rate
        {"split": "train", "step": 20, "ms_per_step": 1000.0},
        {"split": "val", "step": 20, "acc": 0.1},
        {"split": "val", "step": 24, "acc": 0.2},
        {"split": "train", "step": 30, "ms_per_step": 2000.0},
    ]
    curve = rep.val_curve(records, "acc")
    assert curve == [(20, 20.0, 0.1), (24, 28.0, 0.2)]


@needs_data
def test_reproduce_wikitext_smoke(tmp_path, capsys):
    from experiments.language import compare

    args = [
        "--config=tiny",
        f"--data-dir={WIKITEXT}",
        "--train_steps=2",
        "--seeds=0",
        "--variants=nfe-4,explicit",
        f"--out={tmp_path / 'out'}",
        f"--runs={tmp_path / 'runs'}",
    ]
    rows = compare.main(args)
    out = tmp_path / "out"
    table = (out / "compare.md").read_text()
    for label in ("RevDEQ (4 NFE)", "Explicit (4 layers"):
        assert table.count(label) == 2  # one row in each view
    saved = json.loads((out / "compare.json").read_text())
    assert set(saved["rows"]) == {"nfe-4", "explicit"}
    run = saved["rows"]["nfe-4"]["runs"][0]
    assert run["paper_nfe"] == 4 and run["nfe"] == pytest.approx(5.0)  # library adds f(z0)
    assert [p["paper_nfe"] for p in run["sweep"]] == [2, 4]  # one compiled eval, two budgets
    assert all(math.isfinite(p["test_ppl"]) for p in run["sweep"])
    assert (out / "ppl_vs_nfe.png").is_file() and (out / "ppl_vs_time.png").is_file()
    capsys.readouterr()
    again = compare.main(args)  # skips both finished runs
    assert capsys.readouterr().out.count(": done") == 2
    assert again["nfe-4"]["runs"][0]["test_ppl"] == rows["nfe-4"]["runs"][0]["test_ppl"]


def test_reproduce_cifar_smoke(tmp_path, capsys):
    from experiments.vision import compare, data as vdata

    if not (vdata.default_sample_dir() / vdata.SAMPLE_TRAIN).is_file():
        pytest.skip("no CIFAR-10 sample")
    args = [
        "--base=tiny",
        "--train-steps=2",
        "--seeds=0",
        "--models=revdeq-multiscale,resnet18",
        f"--workdir={tmp_path / 'runs'}",
        f"--out={tmp_path / 'out'}",
    ]
    compare.main(args)
    out = tmp_path / "out"
    table = (out / "compare.md").read_text()
    assert table.count("RevDEQ multi-scale") == 2 and table.count("ResNet-18") == 2
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"]["revdeq-multiscale"]["paper_nfe"] == 8  # 2 x (2 + 2) steps
    assert (out / "compare_curves.png").is_file()
    capsys.readouterr()
    compare.main(args)
    assert capsys.readouterr().out.count(": done") == 2


def test_resnet_width_matches_the_deq_parameters():
    """`compare.py` sizes ResNet-18 to the multi-scale RevDEQ's parameter count from
    abstract models (`eqx.filter_eval_shape`). `count_params` once counted 0 for those, so
    the narrowest width (11K parameters against 175K) was picked for the first full run."""
    import equinox as eqx

    from experiments.common.optim import count_params
    from experiments.vision import compare
    from experiments.vision.configs import CONFIGS
    from experiments.vision.train import init_state

    base = CONFIGS["repro"]
    width = compare.matched_resnet_width(base)
    deq = init_state(dataclasses.replace(base, model="implicit-resnet")).model
    resnet = init_state(dataclasses.replace(base, model="resnet18", resnet_width=width)).model
    assert count_params(eqx.filter_eval_shape(lambda: deq)) == count_params(deq)
    assert abs(count_params(resnet) / count_params(deq) - 1) < 0.1  # 176,402 vs 175,122
