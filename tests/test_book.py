"""vaelib.book.glue writes what myst-nb's glue writes, so the book's {glue:text} roles find the values."""

import numpy as np
import pytest
import torch

pytest.importorskip("myst_nb")
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from myst_nb import glue as myst_glue  # noqa: E402

from vaelib.book import glue  # noqa: E402


def _captured(fn, *args):
    shell = InteractiveShell.instance()
    published = []
    original = shell.display_pub.publish
    shell.display_pub.publish = lambda data, metadata=None, **kw: published.append((data, metadata))
    try:
        fn(*args)
    finally:
        shell.display_pub.publish = original
    return published


@pytest.mark.parametrize("value", [3.25, 7, "text"])
def test_glue_matches_myst_nb(value):
    assert _captured(glue, "x", value) == _captured(myst_glue, "x", value, False)


def test_glue_turns_tensors_and_numpy_scalars_into_numbers():
    # A 0-d tensor's repr is "tensor(3.2500)", which a :.2f format spec cannot parse.
    (data, _), = _captured(glue, "x", torch.tensor(3.25))
    assert data["application/papermill.record/text/plain"] == "3.25"
    (data, _), = _captured(glue, "x", np.int64(5))
    assert data["application/papermill.record/text/plain"] == "5"
