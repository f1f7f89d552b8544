"""Test helpers shared by several test files (pytest puts tests/ on sys.path: ``from helpers import ...``)."""

import contextlib

import pytest

from vaelib.cuda_graph import GraphStepper
from vaelib.data import DataNotFoundError, find_dataset

try:
    find_dataset("fashion-mnist")
    HAVE_DATA = True
except DataNotFoundError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST is not installed")


def toy_images() -> tuple:
    """160 training and 32 test images near 4 random prototypes: a data set a tiny VAE learns in a few epochs."""
    import torch

    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 784, generator=g)
    x = (protos[torch.randint(0, 4, (192,), generator=g)] * 0.8 + 0.2 * torch.rand(192, 784, generator=g))
    return x[:160], x[160:]


class GraphLogicOnCPU(GraphStepper):
    """The CUDA-graph stepper with the CUDA calls replaced: "replay" runs the recorded body again (grads set to
    None first, as a replay's backward writes them afresh), streams and devices are no-ops."""

    def _on_device(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _side_stream(self):
        yield

    def _record(self):
        def replay():
            self.opt.zero_grad(set_to_none=True)
            self._body()
        return replay

    def _synchronize(self):
        pass
