"""The built site as a reader sees it: every page in headless Chromium, offline, on a desktop and a phone.

Run by `make browser` after the book is built (part of `make test`). One Chromium serves every page; the pages
are loaded and inspected several at a time (each in a fresh context, as a new reader would open it), once, before
the tests, which then judge each page's findings. It fails on: a MathJax error or TeX left
unrendered, a console error, a request that leaves the machine, a broken image or internal link, a page wider
than a 390 px phone, a display equation or table wider than the text column at 1400 px, an equation that runs
under its number, a search for "ELBO" that finds nothing, and a search for "exercise" that misses a chapter.
"""

from __future__ import annotations

import asyncio
import html.parser
import os
import urllib.parse
from pathlib import Path

import pytest

from .conftest import CHROMIUM, CHROMIUM_ARGS, SITE

DESKTOP = {"width": 1400, "height": 900}
PHONE = {"width": 390, "height": 844}
# The book as a PDF, copied into the site by `make pdf` (tests/test_pdf.py checks that the intro's link finds it).
PDF_NAME = "vae-book.pdf"
VIEWPORTS = {"desktop": DESKTOP, "phone": PHONE}
#: pages open at once: a page spends most of its time in its own renderer process (layout, MathJax), so two per
#: core keep the cores busy while the test waits on the others
PARALLEL_PAGES = 2 * (os.cpu_count() or 1)
SEARCH = "search.html?q=ELBO"
#: every chapter ends with exercises, so the search finds them on every chapter's page
SEARCH_EXERCISES = "search.html?q=exercise"



def _is_page(path: Path) -> bool:
    """A page of the book: not under _static/_images, and not a redirect stub (index.html points at the intro,
    which is tested itself)."""
    if path.relative_to(SITE).parts[0].startswith("_"):
        return False
    # Sphinx writes the stub as <meta http-equiv="Refresh" ...>: HTML attribute values are matched without case.
    return 'http-equiv="refresh"' not in path.read_text(encoding="utf-8", errors="replace")[:2000].lower()


PAGES = sorted(p.relative_to(SITE).as_posix() for p in SITE.rglob("*.html") if _is_page(p)) if SITE.is_dir() else []

# Everything measured in one pass once MathJax has finished typesetting the page.
INSPECT = r"""
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const short = (s) => s.replace(/\s+/g, " ").trim().slice(0, 90);
  const out = {};
  out.untypeset = [...document.querySelectorAll(".math")]
    .filter((e) => !e.querySelector("mjx-container")).map((e) => short(e.textContent));
  out.texErrors = [...document.querySelectorAll("mjx-merror, [data-mjx-error]")]
    .map((e) => short(e.getAttribute("data-mjx-error") || e.textContent));
  // An undefined macro (MathJax's noundefined extension) is shown as red text, not as an error node.
  // (its MathML copy names the macro: <mtext mathcolor="red">\\foo</mtext>).
  out.undefinedMacros = [...document.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]')]
    .map((e) => short(e.textContent));
  out.brokenImages = [...document.images]
    .filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.getAttribute("src"));
  // Figures are 2x PNGs (retina) of matplotlib figures whose text is at least 10 pt, i.e. about 14 px at 1x:
  // shrunk below 72 % of 1x, their text would be under 10 px on the screen.
  out.smallFigures = [...document.querySelectorAll(".cell_output img")]
    .filter((i) => i.naturalWidth > 0 && i.getBoundingClientRect().width < 0.72 * i.naturalWidth / 2)
    .map((i) => `${i.getAttribute("src")} shown at ${Math.round(200 * i.getBoundingClientRect().width
                                                               / i.naturalWidth)} % of 1x`);
  out.pageWidth = document.documentElement.scrollWidth;
  out.viewport = window.innerWidth;
  // Display equations: the formula plus its number must fit the equation's box (no sideways scrolling
  // needed on a desktop), and the number must never sit on top of the formula.
  out.wideEquations = []; out.underNumber = [];
  for (const box of document.querySelectorAll("div.math")) {
    const math = box.querySelector("mjx-container > mjx-math");
    if (!math) continue;
    const container = math.parentElement;
    const eqno = box.querySelector(".eqno");
    const label = eqno ? short(eqno.textContent.replace("#", "")) : short(box.textContent).slice(0, 40);
    const numberWidth = eqno ? eqno.getBoundingClientRect().width : 0;
    if (math.getBoundingClientRect().width + numberWidth > box.clientWidth + 1) out.wideEquations.push(label);
    // The formula's own box must lie inside the equation's box (else part of it is cut off, or runs under
    // the number) and beside the number; a formula wider than that box scrolls inside it.
    const c = container.getBoundingClientRect(), b = box.getBoundingClientRect();
    let hidden = c.left < b.left - 1 || c.right > b.right + 1;
    if (eqno) {
      const n = eqno.getBoundingClientRect();
      const overlap = Math.min(c.right, n.right) - Math.max(c.left, n.left);
      const sameRow = Math.min(c.bottom, n.bottom) - Math.max(c.top, n.top);
      hidden = hidden || (overlap > 1 && sameRow > 1);
    }
    if (hidden) out.underNumber.push(label);
  }
  const column = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
  const style = getComputedStyle(column);
  const columnWidth = column.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  // A table is too wide when it is wider than the text column, or is cut off by the box that holds it.
  out.wideTables = [...column.querySelectorAll("table")]
    .filter((t) => t.getBoundingClientRect().width > columnWidth + 1
                   || t.parentElement.scrollWidth > t.parentElement.clientWidth + 1)
    .map((t) => short(t.textContent).slice(0, 60));
  return out;
}
"""


async def _visit(browser, site_url: str, page_path: str, viewport: dict, slots: asyncio.Semaphore) -> dict:
    """Load a page in a fresh context with every request off this machine refused, and inspect it: INSPECT's
    findings (for a search page, the pages it lists), console errors and refused URLs."""
    async with slots:
        context = await browser.new_context(viewport=viewport)
        refused: list[str] = []
        errors: list[str] = []

        async def route(r):
            host = urllib.parse.urlsplit(r.request.url).hostname
            if host in ("127.0.0.1", "localhost"):
                await r.continue_()
            else:
                refused.append(r.request.url)
                await r.abort()

        found = None
        try:
            await context.route("**/*", route)
            page = await context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{site_url}/{page_path}", wait_until="load")
            if page_path.startswith("search.html?"):
                # Sphinx lists the hits one at a time and says "Search finished" after the last one.
                await page.wait_for_selector("#search-results ul.search li", timeout=20_000)
                await page.wait_for_function(
                    "document.querySelector('#search-results .search-summary')"
                    "?.innerText.startsWith('Search finished')", timeout=20_000)
                found = await page.eval_on_selector_all(
                    "#search-results ul.search li a",
                    "links => [...new Set(links.map(a => a.getAttribute('href').split(/[?#]/)[0]))]")
            else:
                found = await page.evaluate(INSPECT)
        except Exception as err:  # a page that does not load or a search that finds nothing: that page's failure
            errors.append(f"{type(err).__name__}: {err}")
        finally:
            await context.close()
        return {"found": found, "errors": errors, "refused": refused}


async def _inspect_site(site_url: str) -> dict:
    """Every page at both widths, and the search, in one Chromium, PARALLEL_PAGES at a time."""
    from playwright.async_api import async_playwright

    visits = [(path, name) for path in PAGES for name in VIEWPORTS] + [(SEARCH, "desktop"),
                                                                      (SEARCH_EXERCISES, "desktop")]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            slots = asyncio.Semaphore(PARALLEL_PAGES)
            results = await asyncio.gather(*(_visit(browser, site_url, path, VIEWPORTS[name], slots)
                                             for path, name in visits))
        finally:
            await browser.close()
    return dict(zip(visits, results, strict=True))


@pytest.fixture(scope="module")
def inspected(chromium, site_url) -> dict:
    """(page, viewport name) -> that visit's findings, errors and refused requests."""
    return asyncio.run(_inspect_site(site_url))


def _problems(found: dict, errors: list[str], refused: list[str], desktop: bool) -> list[str]:
    problems = []
    for key, what in [("untypeset", "TeX left unrendered"), ("texErrors", "MathJax error"),
                      ("undefinedMacros", "undefined TeX macro"), ("brokenImages", "broken image"),
                      ("underNumber", "equation cut off or under its number")]:
        problems += [f"{what}: {item}" for item in found[key]]
    problems += [f"console error: {e}" for e in errors]
    problems += [f"request off the machine: {u}" for u in refused]
    if desktop:
        problems += [f"equation wider than the column at 1400 px: {e}" for e in found["wideEquations"]]
        problems += [f"table wider than the column at 1400 px: {t}" for t in found["wideTables"]]
        problems += [f"figure text under 10 px at 1400 px: {f}" for f in found["smallFigures"]]
    elif found["pageWidth"] > found["viewport"]:
        problems.append(f"page pans sideways on a phone: {found['pageWidth']} px wide in a {found['viewport']} px "
                        "viewport")
    return problems


@pytest.mark.parametrize("page_path", PAGES)
@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_page_renders(inspected, page_path, viewport):
    visit = inspected[(page_path, viewport)]
    width = VIEWPORTS[viewport]["width"]
    assert visit["found"] is not None, f"{page_path} at {width} px did not load: {visit['errors']}"
    problems = _problems(visit["found"], visit["errors"], visit["refused"], desktop=viewport == "desktop")
    assert not problems, f"{page_path} at {width} px:\n  " + "\n  ".join(problems)


def test_search_finds_elbo(inspected):
    visit = inspected[(SEARCH, "desktop")]
    assert visit["found"] and not visit["errors"] and not visit["refused"], visit


def test_search_finds_every_chapters_exercises(inspected):
    chapters = [p for p in PAGES if p.startswith("chapters/")]
    visit = inspected[(SEARCH_EXERCISES, "desktop")]
    assert not visit["errors"] and not visit["refused"], visit
    missed = sorted(set(chapters) - set(visit["found"] or []))
    assert not missed, f"a search for 'exercise' misses {missed}"


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("img", "script") and attrs.get("src"):
            self.links.append(attrs["src"])
        if tag == "link" and attrs.get("href"):
            self.links.append(attrs["href"])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_internal_links_resolve():
    """Every relative link, image and asset points at a file of the site, and every #anchor exists there."""
    parsed: dict[Path, _Links] = {}

    def links_of(path: Path) -> _Links:  # each page parsed once (setdefault would parse it at every link)
        if path not in parsed:
            parsed[path] = _parse(path)
        return parsed[path]

    broken = []
    for page_path in PAGES:
        page = (SITE / page_path).resolve()
        links = links_of(page)
        for href in links.links:
            split = urllib.parse.urlsplit(href)
            if split.scheme or href.startswith(("//", "mailto:", "javascript:")):
                continue
            target = (page.parent / urllib.parse.unquote(split.path)).resolve() if split.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                if split.path == PDF_NAME and page_path == "intro.html":
                    continue  # the intro's link to the PDF, put there by `make pdf` (its own CI job; publishing)
                broken.append(f"{page_path}: {href} (no such file)")
                continue
            if split.fragment and target.suffix == ".html":
                ids = links_of(target).ids
                if urllib.parse.unquote(split.fragment) not in ids:
                    broken.append(f"{page_path}: {href} (no such anchor)")
    assert not broken, "\n".join(broken)
