"""The book as a PDF (`make pdf`, which runs this file after building it): complete, resolved and rendered.

Checks book/_build/latex/book.pdf, its LaTeX log and source: every chapter's title is in the text (a LaTeX run
that stops early leaves a PDF without the later chapters, jupyter-book #1710), no "??" and no undefined reference,
no LaTeX error and no glyph missing from the fonts, no TeX printed as text, every labelled equation numbered,
every stored figure embedded, the bibliography and every exercise present, and the site's link to the PDF
resolves. Skipped, with the reason, when no PDF was built (`make test` does not build it; CI's `pdf` job does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The LaTeX build: book/_build/latex, or another one named by $VAELIB_LATEX.
LATEX = Path(os.environ.get("VAELIB_LATEX") or ROOT / "book" / "_build" / "latex")
PDF = LATEX / "book.pdf"
SITE = ROOT / "book" / "_build" / "html"
CHAPTERS = sorted((ROOT / "book" / "chapters").glob("*.ipynb"))

pytestmark = [
    pytest.mark.skipif(not PDF.is_file(), reason="no PDF built: run `make pdf` (TeX Live: scripts/ensure-tex.sh)"),
    pytest.mark.skipif(shutil.which("pdftotext") is None, reason="poppler-utils (pdftotext) is not installed"),
]


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@cache
def pdf_text() -> str:
    """The PDF's text in reading order, whitespace collapsed (a title may wrap over lines)."""
    return _collapse(subprocess.run(["pdftotext", str(PDF), "-"], capture_output=True, text=True, check=True).stdout)


@cache
def latex_log() -> str:
    return (LATEX / "book.log").read_text(encoding="utf-8", errors="replace")


def _markdown_sources(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


def chapter_title(path: Path) -> str:
    for source in _markdown_sources(path):
        match = re.search(r"^# (.+)$", source, re.M)
        if match:
            return match.group(1).strip()
    raise AssertionError(f"{path.name} has no '# title'")


def test_page_count():
    info = subprocess.run(["pdfinfo", str(PDF)], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"^Pages:\s+(\d+)", info, re.M).group(1))
    print(f"{PDF}: {pages} pages, {PDF.stat().st_size / 1e6:.1f} MB")
    # Every chapter is several pages long; a PDF cut short by a failed LaTeX run is much shorter.
    assert pages >= 4 * len(CHAPTERS), pages


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_title_in_text(chapter):
    title = chapter_title(chapter)
    assert "$" not in title, f"{chapter.name}: math in the chapter title ({title}) is not checked in the PDF's text"
    # The chapter's own opening ("CHAPTER SEVEN" and its title in capitals), not its line in the table of contents,
    # which a LaTeX run that stopped before the chapter still prints (from the previous run's .toc).
    opening = re.compile(r"CHAPTER [A-Z]+ " + re.escape(_collapse(title).upper()))
    assert opening.search(pdf_text()), f"the PDF has no chapter opening titled: {title}"


def test_bibliography_in_text():
    text = pdf_text()
    assert "BIBLIOGRAPHY" in text.upper()
    # The bibliography comes last: its entries (author-year labels, book/_ext/author_year_bibliography.py) follow
    # the last chapter's title.
    last = _collapse(chapter_title(CHAPTERS[-1]))
    assert re.search(r"\[Kingma and Welling, 2013\] Diederik P\. Kingma", text[text.rindex(last):]), \
        "no bibliography entry after the last chapter"


def test_no_unresolved_references():
    assert "??" not in pdf_text(), "unresolved reference(s) printed as ?? in the PDF"
    undefined = [line for line in latex_log().splitlines() if re.search(r"(Reference|Citation).*undefined", line)]
    assert not undefined, "\n".join(undefined[:20])


def test_no_latex_errors_or_missing_glyphs():
    log = latex_log()
    errors = [line for line in log.splitlines() if line.startswith("!")]
    assert not errors, "LaTeX errors in book.log:\n" + "\n".join(errors[:20])
    missing = sorted(set(re.findall(r"Missing character: There is no (.+?) in font", log)))
    assert not missing, f"characters the PDF's fonts lack (printed as nothing): {missing}"


def test_no_tex_printed_as_text():
    """Outside code (verbatim blocks, inline code), no backslash command or dollar sign is typeset as text: that is
    TeX the LaTeX writer escaped instead of rendering (chapter 10's verbatim quotes are code blocks)."""
    tex = (LATEX / "book.tex").read_text(encoding="utf-8")
    body = tex[tex.index(r"\begin{document}"):]
    body = re.sub(r"\\begin\{sphinxVerbatim[A-Za-z]*\}.*?\\end\{sphinxVerbatim[A-Za-z]*\}", "", body, flags=re.S)
    body = re.sub(r"\\sphinxcode\{\\sphinxupquote\{(?:[^{}]|\{[^{}]*\})*\}\}", "", body)
    leaks = re.findall(r".{0,60}(?:\\textbackslash\{\}[A-Za-z]|\\\$).{0,60}", body)
    assert not leaks, "TeX typeset as text:\n" + "\n".join(leaks[:10])


def test_labelled_equations_are_numbered():
    """Each `$$ ... $$ (label)` of the chapters is a numbered LaTeX equation with that label."""
    tex = (LATEX / "book.tex").read_text(encoding="utf-8")
    missing = []
    count = 0
    for chapter in CHAPTERS:
        for source in _markdown_sources(chapter):
            for label in re.findall(r"^\$\$\s*\(([\w-]+)\)\s*$", source, re.M):
                count += 1
                target = rf"\begin{{equation}}\label{{equation:chapters/{chapter.stem}:{label}}}"
                if target not in tex:
                    missing.append(f"{chapter.stem}:{label}")
    assert count > 0, "no labelled equations found in the chapters"
    assert not missing, f"labelled equations without a numbered equation in the PDF: {missing}"


def test_figures_embedded():
    """Every distinct PNG among the chapters' stored outputs is an image in the PDF."""
    pngs = set()
    for chapter in CHAPTERS:
        for cell in json.loads(chapter.read_text())["cells"]:
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    pngs.add("".join(output["data"]["image/png"]))
    listing = subprocess.run(["pdfimages", "-list", str(PDF)], capture_output=True, text=True, check=True).stdout
    images = sum(1 for line in listing.splitlines()[2:] if line.split()[2] == "image")
    print(f"{len(pngs)} distinct PNG outputs in the chapters, {images} images in the PDF")
    assert images >= len(pngs) > 0


def test_exercises_in_text():
    """Every `exercise` directive of the chapters is in the PDF, numbered, with its title when it has one."""
    titles, count = [], 0
    for chapter in CHAPTERS:
        for source in _markdown_sources(chapter):
            for title in re.findall(r"^(?:`{3,}|:{3,})\{exercise\}[ \t]*(.*)$", source, re.M):
                count += 1
                if title.strip():
                    titles.append(_collapse(title))
    if count == 0:
        pytest.skip("no exercise directives in the chapters")
    text = pdf_text()
    numbers = set(re.findall(r"\bExercise (\d+(?:\.\d+)+)", text))
    assert len(numbers) >= count, f"{count} exercises in the chapters, {len(numbers)} numbered in the PDF"
    absent = [t for t in titles if f"({t})" not in text]
    assert not absent, f"exercise titles not in the PDF: {absent}"


def test_site_links_the_pdf():
    """The intro's download link names the file `make pdf` puts into the site, and it is this PDF."""
    links = re.findall(r'href="([^"]+\.pdf)"', (ROOT / "book" / "intro.md").read_text())
    assert links, "book/intro.md has no link to the PDF"
    for link in links:
        target = SITE / link
        assert target.is_file(), f"the intro links {link}, but {target} does not exist (`make pdf` copies it there)"
        assert target.read_bytes() == PDF.read_bytes(), f"{target} is not the PDF just built"
