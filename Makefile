# revdeq_jax: every target installs what it needs into .venv on first use.
#   make test            fast test suite (what CI runs)
#   make train-wikitext  the main job: RevDEQ transformer LM on WikiText
#   make reproduce-wikitext / reproduce-cifar   the paper's orderings at CPU scale (~90 min each)
#   make docs            build the documentation site into site/ (make docs-serve: preview)
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
CONFIG  ?= small
DATA_DIR ?=
RUNS    ?= runs
# reproduce-*: the whole comparison's wall-clock in minutes, seeds, and where runs go; run the
# target again to continue an interrupted comparison (finished runs are skipped)
BUDGET_MIN ?= 90
SEEDS   ?= 0,1
# e.g. TRAIN_FLAGS=--resume (continue the run) or TRAIN_FLAGS=--overwrite (start it over)
TRAIN_FLAGS ?=
DATA_FLAG := $(if $(DATA_DIR),--data-dir=$(DATA_DIR),)
# WikiText: DATA_DIR, else the offline WikiText-2 copy beside the repository if there is one,
# else the Hugging Face hub.
LM_DATA := $(or $(DATA_DIR),$(wildcard ../shared/data/wikitext-2-raw))
LM_DATA_FLAG := $(if $(LM_DATA),--data-dir=$(LM_DATA),)

.PHONY: help install test test-slow test-all lint format bench smoke docs docs-serve dist \
        train-wikitext eval-wikitext compare-wikitext train-cifar eval-cifar compare-cifar clean \
        reproduce-wikitext reproduce-cifar

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'
	@echo "Targets: install test test-slow test-all lint format bench smoke docs docs-serve dist"
	@echo "         train-wikitext eval-wikitext compare-wikitext train-cifar eval-cifar compare-cifar"
	@echo "         reproduce-wikitext reproduce-cifar (BUDGET_MIN=$(BUDGET_MIN) SEEDS=$(SEEDS))"
	@echo "Variables: CONFIG=$(CONFIG) DATA_DIR=<dir> RUNS=$(RUNS) TRAIN_FLAGS=--resume|--overwrite"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,experiments,docs]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --durations=25

test-slow: $(STAMP)
	$(PY) -m pytest -q -n auto -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -n auto -m "slow or not slow"

lint: $(STAMP)
	$(PY) -m ruff check src tests experiments benchmarks examples docs/_hooks.py docs/_griffe_equinox.py
	$(PY) -m ruff format --check src tests experiments benchmarks examples docs/_hooks.py docs/_griffe_equinox.py

format: $(STAMP)
	$(PY) -m ruff format src tests experiments benchmarks examples
	$(PY) -m ruff check --fix src tests experiments benchmarks examples

# The documentation site (mkdocs-material + mkdocstrings); --strict fails on any broken
# reference, missing page or snippet. MathJax comes from a PyPI package: nothing is fetched.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# Wheel and sdist into dist/, checked with twine.
dist: $(STAMP)
	$(PY) -m pip install --quiet -e ".[release]"
	rm -rf dist
	$(PY) -m build
	$(PY) -m twine check --strict dist/*

bench: $(STAMP)
	$(PY) -m benchmarks.adjoints --out benchmarks/results
	$(PY) -m benchmarks.precision --out benchmarks/results
	$(PY) -m benchmarks.exact --out benchmarks/results
	$(PY) -m benchmarks.jacobian --out benchmarks/results
	$(PY) -m benchmarks.batch_memory --out benchmarks/results

train-wikitext: $(STAMP)
	$(PY) -m experiments.language.train --config=$(CONFIG) $(LM_DATA_FLAG) --workdir=$(RUNS)/wikitext-$(CONFIG) $(TRAIN_FLAGS)

eval-wikitext: $(STAMP)
	$(PY) -m experiments.language.evaluate --workdir=$(RUNS)/wikitext-$(CONFIG) $(LM_DATA_FLAG)

compare-wikitext: $(STAMP)
	$(PY) -m experiments.language.compare $(LM_DATA_FLAG)

reproduce-wikitext: $(STAMP)
	$(PY) -m experiments.language.compare --config=repro $(LM_DATA_FLAG) --budget_min=$(BUDGET_MIN) \
		--seeds=$(SEEDS) --runs=$(RUNS)/reproduce-wikitext --out=experiments/language/results

train-cifar: $(STAMP)
	$(PY) -m experiments.vision.train --config=$(CONFIG) $(DATA_FLAG) --workdir=$(RUNS)/cifar-$(CONFIG) $(TRAIN_FLAGS)

eval-cifar: $(STAMP)
	$(PY) -m experiments.vision.evaluate --workdir=$(RUNS)/cifar-$(CONFIG) $(DATA_FLAG)

compare-cifar: $(STAMP)
	$(PY) -m experiments.vision.compare $(DATA_FLAG)

reproduce-cifar: $(STAMP)
	$(PY) -m experiments.vision.compare --base=repro $(DATA_FLAG) --budget-min=$(BUDGET_MIN) \
		--seeds=$(SEEDS) --workdir=$(RUNS)/reproduce-cifar

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site dist
