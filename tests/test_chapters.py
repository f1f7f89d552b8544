"""The chapter pairs and the book's wiring.

- Each notebooks/NN_name.md and book/chapters/NN_name.ipynb hold the same cells (types and sources), read with
  jupytext.read: file times (what `jupytext --sync` trusts) and header metadata play no part.
- Each chapter's first code cell is the Colab setup cell, installing from the one repository URL in
  book/_config.yml, and it documents the quick-mode variable.
- The table of contents lists every chapter, and every chapter has stored outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import pytest
import yaml

from vaelib.config import QUICK_ENV

ROOT = Path(__file__).resolve().parents[1]
MD_FILES = sorted((ROOT / "notebooks").glob("*.md"))
IPYNB_FILES = sorted((ROOT / "book" / "chapters").glob("*.ipynb"))
STEMS = sorted({p.stem for p in MD_FILES} | {p.stem for p in IPYNB_FILES})


def cells(path: Path) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]


def book_config() -> dict:
    return yaml.safe_load((ROOT / "book" / "_config.yml").read_text())


def test_there_are_chapters():
    assert STEMS, "no chapters found"


@pytest.mark.parametrize("stem", STEMS)
def test_pair_has_the_same_cells(stem):
    md = ROOT / "notebooks" / f"{stem}.md"
    nb = ROOT / "book" / "chapters" / f"{stem}.ipynb"
    assert md.exists(), f"{nb.name} has no MyST twin notebooks/{md.name}"
    assert nb.exists(), f"{md.name} has no executed twin book/chapters/{nb.name}: run `make notebooks NB={stem}`"
    md_cells, nb_cells = cells(md), cells(nb)
    for i, (a, b) in enumerate(zip(md_cells, nb_cells, strict=False)):  # lengths compared below
        assert a == b, (f"{stem}: cell {i} differs between the .md and the .ipynb; edit the .md, then "
                        f"`make notebooks NB={stem}`.\n--- md ---\n{a[1][:400]}\n--- ipynb ---\n{b[1][:400]}")
    assert len(md_cells) == len(nb_cells), f"{stem}: {len(md_cells)} cells in the .md, {len(nb_cells)} in the .ipynb"


def test_repository_url_is_defined_once():
    url = book_config()["repository"]["url"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url


@pytest.mark.parametrize("stem", [p.stem for p in IPYNB_FILES])
def test_first_code_cell_is_the_colab_setup(stem):
    url = book_config()["repository"]["url"]
    nb = jupytext.read(ROOT / "book" / "chapters" / f"{stem}.ipynb")
    first = next(c for c in nb.cells if c.cell_type == "code").source
    assert f'"vaelib @ git+{url}"' in first, f"{stem}: the setup cell must pip-install vaelib from {url}"
    assert "import vaelib" in first.split("except")[0], f"{stem}: the setup cell must try `import vaelib` first"
    assert QUICK_ENV in first, f"{stem}: the setup cell must document {QUICK_ENV}"


@pytest.mark.parametrize("stem", [p.stem for p in IPYNB_FILES])
def test_chapter_is_stored_with_outputs(stem):
    nb = jupytext.read(ROOT / "book" / "chapters" / f"{stem}.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{stem}: not every code cell was executed"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])), \
        f"{stem}: stored outputs contain an error"


def test_toc_lists_every_chapter():
    toc = (ROOT / "book" / "_toc.yml").read_text()
    listed = set(re.findall(r"file:\s*chapters/(\S+)", toc))
    assert listed == {p.stem for p in IPYNB_FILES}


def test_every_chapter_checks_some_output():
    for path in IPYNB_FILES:
        sources = "\n".join(c.source for c in jupytext.read(path).cells if c.cell_type == "code")
        assert "assert" in sources, f"{path.stem}: displays results but asserts nothing"
