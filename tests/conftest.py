"""Shared pytest setup."""

import torch

# The unit tests use tiny models, for which intra-op threads cost more in synchronisation than they gain,
# and on a shared 2-core machine a second spinning thread can slow a test down tenfold.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def interrupt_at_epoch(monkeypatch):
    """Make the eager trainer raise KeyboardInterrupt (as Ctrl-C would) when it starts epoch ``n`` (1-based).

    ``arm(n)`` returns a function that disarms it again (to resume in the same test).
    """
    from vaelib import training

    def arm(n: int):
        real = training._EagerStepper.run_epoch
        calls = {"n": 0}

        def run_epoch(self, *args):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(self, *args)

        monkeypatch.setattr(training._EagerStepper, "run_epoch", run_epoch)
        return lambda: monkeypatch.setattr(training._EagerStepper, "run_epoch", real)

    return arm
