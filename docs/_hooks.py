"""MkDocs hooks: add the files the site needs that live outside `docs/`.

- MathJax 3 (`tex-svg.js`, self-contained: no font files) from the installed
  `django-static-mathjax` package (module `mathjax`), so the built site renders maths
  offline and the build fetches nothing.
- The plots committed next to the benchmark and experiment results, so the result
  pages (which include the committed `.md` tables with `pymdownx.snippets`) show the
  current files.
"""

import importlib.util
import pathlib

from mkdocs.structure.files import File


ROOT = pathlib.Path(__file__).resolve().parent.parent

PLOTS = {
    "results/adjoints.png": "benchmarks/results/adjoints.png",
    "results/precision.png": "benchmarks/results/precision.png",
    "results/ppl_vs_time.png": "experiments/language/results/ppl_vs_time.png",
    "results/compare_curves.png": "experiments/vision/results/compare_curves.png",
}


def _mathjax_script() -> pathlib.Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The docs need MathJax from the `django-static-mathjax` package: "
            "`pip install -e '.[docs]'` (or `make docs`)."
        )
    pkg = pathlib.Path(next(iter(spec.submodule_search_locations)))
    script = pkg / "static" / "mathjax" / "es5" / "tex-svg.js"
    if not script.is_file():
        raise RuntimeError(f"MathJax's `tex-svg.js` is missing from {pkg}.")
    return script


def on_files(files, config):
    extra = {"javascripts/mathjax/tex-svg.js": _mathjax_script()}
    for uri, path in PLOTS.items():
        extra[uri] = ROOT / path
    for uri, path in extra.items():
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: the docs page `{uri}` needs it.")
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
