"""The documentation site builds with `mkdocs build --strict` (every page, every API
object and every cross-reference resolves; snippets and plots exist) and renders in a
browser: maths typeset by the bundled MathJax, code blocks highlighted.

Needs the `docs` extra (`pip install -e ".[docs]"`, which `make test` installs); the
browser check needs Chromium (Debian package `chromium`, which `.ci/run` installs).
"""

import importlib.util
import inspect
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
_MISSING = [
    m
    for m in ("mkdocs", "material", "mkdocstrings_handlers.python", "mathjax")
    if importlib.util.find_spec(m.split(".")[0]) is None
    or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)
]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"the docs extra is not installed (missing {', '.join(_MISSING)}): "
    'pip install -e ".[docs]"',
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-6000:]}"
    return out


def test_build_strict(site):
    for page in [
        "index.html",
        "getting-started/index.html",
        "api/fixed_point/index.html",
        "guides/precision/index.html",
        "results/precision/index.html",
        "javascripts/mathjax/tex-svg.js",
        "results/precision.png",
    ]:
        assert (site / page).is_file(), page


def test_every_public_name_is_documented(site):
    import revdeq_jax as rdeq
    import revdeq_jax.nn as rnn

    html = "".join(p.read_text() for p in (site / "api").rglob("index.html"))

    def public(module):
        # The names `__init__.py` re-exports (`X as X`): everything but modules and dunders.
        return [
            f"{module.__name__}.{n}"
            for n, obj in vars(module).items()
            if not n.startswith("_") and not inspect.ismodule(obj)
        ]

    names = public(rdeq) + public(rnn)
    assert "revdeq_jax.fixed_point" in names and "revdeq_jax.nn.WeightNorm" in names
    missing = [n for n in names if f'id="{n}"' not in html]
    assert not missing, f"no API entry for {missing}"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _dump_dom(browser: str, page: pathlib.Path) -> str:
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=20000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(
    _chromium() is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium)",
)
@pytest.mark.parametrize(
    "page,text",
    [
        ("index.html", "revdeq_jax"),
        ("api/fixed_point/index.html", "revdeq_jax.fixed_point"),
        ("guides/reversible-solving/index.html", "Algorithm 1"),
    ],
)
def test_page_renders_maths_and_code(site, page, text):
    dom = _dump_dom(_chromium(), site / page)
    assert text in dom
    # MathJax ran (from the site itself: no network) and typeset every formula.
    math = re.findall(r'<span class="arithmatex">(.*?)</span>', dom, re.S)
    math += re.findall(r'<div class="arithmatex">(.*?)</div>', dom, re.S)
    assert math, f"{page} has no maths"
    untypeset = [m for m in math if "<mjx-container" not in m]
    assert not untypeset, f"{page}: {len(untypeset)} formulas left as TeX, e.g. {untypeset[0]!r}"
    assert "<svg" in dom and 'jax="SVG"' in dom
    # Code blocks are there, highlighted by Pygments, and Material's JavaScript ran (it
    # adds the copy button to each).
    blocks = re.findall(r'<div class="highlight"><pre id="__code_\d+">(.*?)</pre>', dom, re.S)
    assert blocks, f"{page}: no code block"
    assert all('<span class="' in b for b in blocks), f"{page}: a code block is not highlighted"
    assert all("md-code__button" in b for b in blocks), f"{page}: Material's JS did not run"
