"""Shared pytest setup."""

import torch

# The unit tests use tiny models, for which intra-op threads cost more in synchronisation than they gain,
# and on a shared 2-core machine a second spinning thread can slow a test down tenfold.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """Every test not marked ``cuda`` runs on the CPU, also on a machine with a GPU (so `make test` there runs the
    same suite): ``select_device()`` without an argument, hence ``fit``/``load_run``/the CLI, honours
    $VAELIB_DEVICE."""
    from vaelib.config import DEVICE_ENV

    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv(DEVICE_ENV, "cpu")


@pytest.fixture
def interrupt_at_epoch(monkeypatch):
    """Make training raise KeyboardInterrupt (as Ctrl-C would) when it starts epoch ``n`` (1-based), on the eager
    path (``train_epoch``) and on the CUDA-graph path (``GraphStepper.run_epoch``) alike.

    ``arm(n)`` returns a function that disarms it again (to resume in the same test).
    """
    from vaelib import training
    from vaelib.cuda_graph import GraphStepper

    def arm(n: int):
        real = {"eager": training.train_epoch, "graph": GraphStepper.run_epoch}
        calls = {"n": 0}

        def interrupting(run_epoch):
            def wrapped(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == n:
                    raise KeyboardInterrupt
                return run_epoch(*args, **kwargs)
            return wrapped

        monkeypatch.setattr(training, "train_epoch", interrupting(real["eager"]))
        monkeypatch.setattr(GraphStepper, "run_epoch", interrupting(real["graph"]))

        def disarm():
            monkeypatch.setattr(training, "train_epoch", real["eager"])
            monkeypatch.setattr(GraphStepper, "run_epoch", real["graph"])
        return disarm

    return arm
