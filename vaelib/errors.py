"""The one base of every error vaelib reports on purpose.

A :class:`VaelibError` says what went wrong and what to do in its message, so the CLI prints that message as one
line and exits with status 2; anything else is a bug and keeps its traceback. Subclasses also derive from the
built-in exception that fits (``FileNotFoundError``, ``ValueError``, ...), so code that caught those still does.
"""

from __future__ import annotations


class VaelibError(Exception):
    """Base class of vaelib's errors: the message is complete and fit for one line."""


class InvalidInputError(VaelibError, ValueError):
    """Data given to a vaelib function that it cannot use (empty, NaN or infinite values)."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says that memory ran out: Python's MemoryError, torch's OutOfMemoryError (CUDA), or the
    RuntimeError torch's CPU and MPS allocators raise ("can't allocate memory", "out of memory")."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


__all__ = ["InvalidInputError", "VaelibError", "is_out_of_memory"]
