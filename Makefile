# The README's two commands are `make book` (the main job) and `make test` (everything CI checks).
# Both start from a fresh clone: they create .venv, install torch (CPU wheel) then the project, and get the data.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := book

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# torch first, so that the project's range (torch>=2.1,<3) is already met and pip pulls no other build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.vaelib-installed
# Chapters to re-execute with `make notebooks` (stems); default all.
NB ?= $(basename $(notdir $(wildcard notebooks/*.md)))
# This machine's pip configuration prints one warning per package about absent local indexes: drop those lines.
QUIET_PIP := sed -u '/is ignored: it is neither a file nor a directory/d'
# Tests, notebooks and the book import this checkout's vaelib, whichever checkout the venv was installed from.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),)

.PHONY: book test pdf notebooks exercises data venv lint pairs unit nbval book-strict browser benchmark scrub clean reference

# MathJax is served from the site (no CDN): the official npm package's browser bundles, fetched once.
MATHJAX_VERSION := 3.2.2
MATHJAX := book/_assets/mathjax/$(MATHJAX_VERSION).version

## book: build the site into book/_build/html from the stored notebook outputs (the main job)
book: venv data $(MATHJAX)
	$(BIN)/jupyter-book build book

$(MATHJAX): scripts/fetch-mathjax.sh
	bash scripts/fetch-mathjax.sh $(MATHJAX_VERSION) book/_assets/mathjax

## test: lint, pair check, unit tests, nbval over every chapter in quick mode, strict book build, browser test
test: venv data lint pairs unit nbval book-strict browser

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet -e ".[book,site]" 2>&1 | $(QUIET_PIP)
	touch $@

## data: find Fashion-MNIST; as root with apt, install Debian's dataset-fashion-mnist; else say how to get it
data: venv
	@bash scripts/ensure-data.sh $(PY)

## lint: ruff over the package and tests; the chapters' code at most 88 columns (the width of the column on the
## site and in Colab); actionlint over the workflows
lint: venv
	$(BIN)/ruff check vaelib tests benchmarks
	$(BIN)/ruff check --select E501 --line-length 88 book/chapters
	$(BIN)/actionlint

## pairs: each notebooks/*.md and its book/chapters/*.ipynb have the same cells (read with jupytext)
pairs: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/test_chapters.py

unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/test_chapters.py --ignore=tests/browser \
	  --ignore=tests/test_pdf.py

nbval: venv
	VAELIB_QUICK=1 $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg book/chapters

book-strict: venv $(MATHJAX)
	rm -rf book/_build
	$(BIN)/jupyter-book build book -W -n --keep-going

## browser: every page of the built site in headless Chromium, offline, at 1400 and 390 px (after book-strict)
browser: venv
	bash scripts/ensure-browser.sh
	@if [ -x "$${VAELIB_CHROMIUM:-/usr/bin/chromium}" ]; then $(PY) -m pytest -q -p no:cacheprovider tests/browser; fi

## pdf: the whole book as a PDF with jupyter-book's LaTeX builder (XeLaTeX; as root, scripts/ensure-tex.sh installs
## Debian's TeX Live), into book/_build/latex/book.pdf and the site (book/_build/html/vae-book.pdf, linked from the
## intro), then its check (tests/test_pdf.py). Not part of `make test`: CI runs it as its own job.
PDF_NAME := vae-book.pdf
pdf: venv
	bash scripts/ensure-tex.sh
	rm -rf book/_build/latex
	$(BIN)/jupyter-book build book --builder pdflatex -W -n --keep-going
	install -D -m 644 book/_build/latex/book.pdf book/_build/html/$(PDF_NAME)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_pdf.py

## notebooks: carry each .md into its .ipynb and re-execute in FULL mode (regenerates stored outputs). NB=stem for one.
## The .md is the file one edits, so it is always the source: `jupytext --sync` would pick the newer file by its
## time stamp, and a checkout or merge can leave the .ipynb newer and overwrite the .md's edits.
TO_IPYNB = $(BIN)/jupytext --quiet --update --to ipynb --output book/chapters/$$nb.ipynb notebooks/$$nb.md
notebooks: venv data
	for nb in $(NB); do \
	  $(TO_IPYNB); \
	  env -u VAELIB_QUICK $(BIN)/jupyter execute --inplace --timeout=3600 book/chapters/$$nb.ipynb; \
	done

## exercises: carry each .md into its .ipynb (keeping the stored outputs), then execute only its exercises (the
## setup and device cells, then the "## Exercises" section) in a fresh kernel in FULL mode, storing their outputs.
## NB=stem for one.
exercises: venv data
	for nb in $(NB); do \
	  $(TO_IPYNB); \
	  env -u VAELIB_QUICK $(PY) scripts/execute-exercises.py $$nb; \
	done

## benchmark: training-speed benchmark on this machine; writes benchmarks/results/<device>-<host>-<time>.json
## (BENCH_ARGS="--threads 2 --epochs 5 --out benchmarks/results/cpu-2threads.json" writes the committed CPU result)
BENCH_ARGS ?=
benchmark: venv data
	$(PY) benchmarks/train_speed.py $(BENCH_ARGS)

## scrub: regenerate the stored notebooks from their .md twins without outputs (NB=stem for one)
scrub: venv
	for nb in $(NB); do $(BIN)/jupytext --quiet --to ipynb --output book/chapters/$$nb.ipynb notebooks/$$nb.md; done

clean:
	rm -rf book/_build .pytest_cache

## reference: train (or continue) the book's reference models and export them to vaelib/weights (NAME=... for some;
## about 80 minutes for all on two idle cores), then measure their test figures
reference: venv data
	$(PY) -m vaelib reference train $(NAME)
	$(PY) -m vaelib reference evaluate $(NAME)
