"""Every script in `examples/` runs, as a user would run it, on the CPU."""

import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["JAX_PLATFORMS"] = "cpu"
    # Single-threaded Eigen in each example: the suite runs on every core already (xdist), and
    # oversubscribed threads starve the collective tests running beside these.
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.strip(), f"{path.name} printed nothing"
