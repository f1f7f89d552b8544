"""Helpers for the book's notebooks: numbers in the prose come from the run that printed them.

``glue(name, value)`` stores ``value`` in the cell's outputs the way myst-nb's ``glue`` does (same mime prefix
and metadata), so that ``{glue:text}`name:.2f``` in the chapter's text shows the number the run produced. It
does not import myst-nb, which a reader's kernel (Colab) need not have; there the stored output is simply
not shown.
"""

from __future__ import annotations

import numbers
from typing import Any

#: The mime prefix myst-nb reads glued values from (``myst_nb.ext.glue.GLUE_PREFIX``).
GLUE_PREFIX = "application/papermill.record/"


def _plain(value: Any) -> Any:
    """Python scalars for tensors and NumPy scalars, so that a format spec such as ``:.2f`` applies."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        value = item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def glue(name: str, value: Any) -> Any:
    """Store ``value`` under ``name`` for ``{glue:text}`` in this page's prose, without displaying it.

    Returns ``value`` unchanged, so a cell can glue and use a number in one line.
    """
    from IPython.core.formatters import format_display_data
    from IPython.display import display

    bundle, metadata = format_display_data(_plain(value))
    metadata["scrapbook"] = {"name": name, "mime_prefix": GLUE_PREFIX}
    display({GLUE_PREFIX + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
    return value
