"""The book in the PDF (the LaTeX builder) exactly as on the site (MathJax).

Three things the HTML build gets for free and LaTeX does not:

* The macros. MathJax knows ``\\KL``, ``\\E`` and ``\\N`` from ``mathjax3_config`` in book/_config.yml; LaTeX
  is given the same definitions, read from that one place, in the preamble.
* Environments inside ``$$``. Sphinx wraps every displayed equation in ``equation`` + ``split``, so an ``align``
  (or ``gather``, ``equation``) written inside ``$$`` nests one display environment in another and stops the
  LaTeX run (jupyter-book #2289). For LaTeX only, such blocks are rewritten to the inner forms ``aligned`` and
  ``gathered``; numbering and labels stay with Sphinx's outer ``equation``.
* Math in headings. A heading becomes the PDF's bookmark (a plain string) too, and TeX inside it stops the run
  (``\\varepsilon`` under unicode-math: "Improper alphabetic constant"; jupyter-book #1540, the PDF's table of
  contents). In headings, math is written as ``\\texorpdfstring{math}{plain text}``, the plain text with Greek
  letters as Unicode.

Two things about LaTeX's layout:

* Tables. Sphinx sets a Markdown table's columns to their natural width (``l``), so a table with long cells (the
  intro's notation table) runs off the page. A table too wide for the line gets columns that wrap instead, each
  as wide as its average cell and no narrower than its longest word (as ``:widths:`` would set them).
* The class. sphinx-jupyterbook-latex's ``jupyterBook`` class loads the package ``bbm`` for shortcuts the book
  never uses (``\\RR``...), and ``bbm`` is only in Debian's texlive-fonts-extra (500 MB to download). A stand-in
  (``\\mathbbm`` as ``\\mathbb``) is written next to the .tex instead.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform

# Display environments that cannot sit inside split, and the inner form that can.
_INNER = {"align": "aligned", "gather": "gathered", "alignat": "alignedat", "flalign": "aligned"}
_DISPLAY = re.compile(r"\\(begin|end)\{(align|gather|alignat|flalign|equation|eqnarray)\*?\}")


def _inner_form(match: re.Match) -> str:
    edge, name = match.group(1), match.group(2)
    if name == "equation":
        return ""  # the outer equation is Sphinx's own
    if name == "eqnarray":
        return rf"\{edge}{{aligned}}"
    return rf"\{edge}{{{_INNER[name]}}}"


def display_math_for_latex(text: str) -> str:
    """``text`` of a ``$$`` block with its display environments replaced by ones that nest inside split."""
    return _DISPLAY.sub(_inner_form, text)


class NestableDisplayMath(SphinxPostTransform):
    default_priority = 400
    formats = ("latex",)

    def run(self, **kwargs) -> None:
        for block in self.document.findall(nodes.math_block):
            if block.get("nowrap"):
                continue  # written verbatim by Sphinx (amsmath blocks outside $$): already a display environment
            text = block.astext()
            fixed = display_math_for_latex(text)
            if fixed != text:
                block.children = [nodes.Text(fixed)]


def _greek(name: str) -> str | None:
    """``alpha`` -> α, ``Sigma`` -> Σ, ``varepsilon`` -> ε; None for a command that is not a Greek letter."""
    base = name.removeprefix("var")
    case = "CAPITAL" if base[:1].isupper() else "SMALL"
    try:
        return unicodedata.lookup(f"GREEK {case} LETTER {base.upper()}")
    except KeyError:
        return None


# Commands that only choose a font or a delimiter size: dropped from the plain form.
_FORMATTING = {"mathcal", "mathrm", "mathbb", "mathbf", "operatorname", "text", "left", "right", "middle", "big",
               "Big", "bigl", "bigr", "quad", "qquad"}
_WORDS = {"mid": "|", "cdot": "·", "times": "×", "log": "log", "le": "≤", "ge": "≥", "infty": "∞", "sim": "~"}


def plain_text_of_math(tex: str) -> str:
    """A readable plain-text form of a short formula, for a PDF bookmark: ``\\mu + \\Sigma\\varepsilon``
    -> ``μ + Σε``."""

    def command(match: re.Match) -> str:
        name = match.group(1)
        if name in _FORMATTING:
            return ""
        return _greek(name) or _WORDS.get(name, name)

    text = re.sub(r"\\([A-Za-z]+)", command, tex)
    text = re.sub(r"\\.", "", text)  # spacing commands such as \, and \!
    text = text.replace("^2", "²").replace("^", "").replace("_", "")  # sub/superscript marks stop a PDF string
    return re.sub(r"\s+", " ", text.replace("{", "").replace("}", "")).strip()


class MathInHeadings(SphinxPostTransform):
    """Math in a heading as ``\\texorpdfstring``: typeset in the text, plain in the PDF's bookmarks."""

    default_priority = 400
    formats = ("latex",)

    def run(self, **kwargs) -> None:
        for title in self.document.findall(nodes.title):
            for math in list(title.findall(nodes.math)):
                tex = math.astext()
                raw = rf"\texorpdfstring{{\protect\({tex}\protect\)}}{{{plain_text_of_math(tex)}}}"
                math.replace_self(nodes.raw("", raw, format="latex"))


# About the characters of a line of the text column at the body's size (17.5 cm in the jupyterBook class).
LINE_CHARACTERS = 100


def wrapping_widths(cells_by_column: list[list[str]]) -> list[int] | None:
    """Relative widths for columns that wrap, or None when the table's natural width fits the line: each column
    as wide as its average cell, but no narrower than its longest word (4 to 60 characters)."""
    longest = [max((len(c) for c in column), default=0) for column in cells_by_column]
    if sum(longest) <= LINE_CHARACTERS:
        return None
    widths = []
    for column in cells_by_column:
        average = sum(map(len, column)) / max(1, len(column))
        # The longest word, plus room for the cell's padding.
        word = max((len(w) for cell in column for w in cell.split()), default=0) + 2
        widths.append(min(60, max(4, word, round(average))))
    return widths


class WrappingTables(SphinxPostTransform):
    """Tables wider than the line get proportional (wrapping) columns, as ``:widths:`` would give them."""

    default_priority = 400
    formats = ("latex",)

    def run(self, **kwargs) -> None:
        for table in self.document.findall(nodes.table):
            if "colwidths-given" in table["classes"]:
                continue
            tgroups = [t for t in table.children if isinstance(t, nodes.tgroup)]
            if len(tgroups) != 1:
                continue
            colspecs = [c for c in tgroups[0].children if isinstance(c, nodes.colspec)]
            rows = list(tgroups[0].findall(nodes.row))
            if any("morecols" in entry for row in rows for entry in row.children):
                continue  # spanning cells: leave the layout to Sphinx
            columns = [[] for _ in colspecs]
            for row in rows:
                for i, entry in enumerate(row.children[: len(colspecs)]):
                    columns[i].append(_typeset_text(entry))
            widths = wrapping_widths(columns)
            if widths is None:
                continue
            for colspec, width in zip(colspecs, widths, strict=True):
                colspec["colwidth"] = width
            table["classes"].append("colwidths-given")


def _typeset_text(entry: nodes.Element) -> str:
    """A cell's text about as long as it is typeset. A formula counts as one word (it does not break across lines)
    half again as long as its plain form (italic letters and the space around operators are wider than text):
    ``\\mathcal{N}(\\mu, 1)`` as ``N(μ,1)___``, not as its TeX source."""
    entry = entry.deepcopy()
    for math in list(entry.findall(nodes.math)):
        formula = plain_text_of_math(math.astext()).replace(" ", "")
        math.replace_self(nodes.Text(formula + "_" * (len(formula) // 2)))
    return _collapse(entry.astext())


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def latex_macro(name: str, definition: str | list) -> str:
    """``\\newcommand`` for one MathJax macro: ``"body"`` or ``["body", number_of_arguments]``."""
    if isinstance(definition, str):
        return rf"\newcommand{{\{name}}}{{{definition}}}"
    body, arity = definition[0], int(definition[1])
    return rf"\newcommand{{\{name}}}[{arity}]{{{body}}}"


def _add_macros(app: Sphinx, config) -> None:
    macros = ((config.mathjax3_config or {}).get("tex") or {}).get("macros") or {}
    if not macros:
        return
    elements = dict(config.latex_elements or {})
    definitions = "\n".join(latex_macro(name, value) for name, value in macros.items())
    block = "% The MathJax macros of book/_config.yml (book/_ext/latex_book.py)\n" + definitions + "\n"
    elements["preamble"] = elements.get("preamble", "") + "\n" + block
    config.latex_elements = elements


BBM_STAND_IN = r"""\NeedsTeXFormat{LaTeX2e}
\ProvidesPackage{bbm}[2026/12/07 stand-in from book/_ext/latex_book.py: mathbbm is amssymb's mathbb]
\RequirePackage{amssymb}
\providecommand{\mathbbm}[1]{\mathbb{#1}}
"""


def _write_bbm_stand_in(app: Sphinx) -> None:
    if app.builder.format == "latex":
        Path(app.outdir).mkdir(parents=True, exist_ok=True)
        (Path(app.outdir) / "bbm.sty").write_text(BBM_STAND_IN)


def setup(app: Sphinx) -> dict:
    app.add_post_transform(NestableDisplayMath)
    app.add_post_transform(MathInHeadings)
    app.add_post_transform(WrappingTables)
    app.connect("config-inited", _add_macros)
    app.connect("builder-inited", _write_bbm_stand_in)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
