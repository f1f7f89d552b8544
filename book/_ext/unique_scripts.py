"""Drop repeated inline scripts from every page.

sphinx-thebe adds its configuration script (``const THEBE_JS_URL = ...``) once per read of the documents, and
jupyter-book reads them twice, so each page declared the constant twice and the browser logged a SyntaxError.
"""

from __future__ import annotations

from sphinx.application import Sphinx


def _unique_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        # The same script is added once with filename None and once with "" (an inline script has no file).
        key = (getattr(script, "filename", script) or "", tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", _unique_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
