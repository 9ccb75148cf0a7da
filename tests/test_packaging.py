"""The release artefacts: the wheel holds only the library, the sdist the library and its
metadata (no experiments, benchmarks, tests, data or run directories).

Builds with `python -m build --no-isolation` (the dev extra installs `build` and
`hatchling`), so no network is needed; `make dist` builds in isolation and runs
`twine check`.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None or importlib.util.find_spec("hatchling") is None,
    reason='`build` and `hatchling` are not installed: pip install -e ".[dev]"',
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _version() -> str:
    # The one place the version is written (no tomllib: Python 3.10 is supported).
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"$', text, re.M).group(1)


def test_wheel_holds_only_the_library(dist):
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"revdeq_jax-{_version()}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "revdeq_jax/__init__.py" in names and "revdeq_jax/py.typed" in names
    outside = [
        n for n in names if not n.startswith(("revdeq_jax/", f"revdeq_jax-{_version()}.dist-info/"))
    ]
    assert not outside, f"the wheel holds files outside the library: {outside}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_sdist_holds_the_library_and_its_metadata(dist):
    (sdist,) = dist.glob("*.tar.gz")
    prefix = f"revdeq_jax-{_version()}/"
    names = [n.removeprefix(prefix) for n in tarfile.open(sdist).getnames()]
    for needed in ["pyproject.toml", "README.md", "CHANGELOG.md", "src/revdeq_jax/__init__.py"]:
        assert needed in names
    allowed = (
        "src/revdeq_jax/",
        "PKG-INFO",
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        ".gitignore",
    )
    outside = [n for n in names if n and not n.startswith(allowed)]
    assert not outside, f"the sdist holds files outside the library: {outside}"
    for unwanted in ("experiments/", "benchmarks/", "tests/", "runs/", "data/", "docs/"):
        assert not [n for n in names if n.startswith(unwanted)]
