"""A training step captured once as a CUDA graph and replayed once per batch: capture and replay only.

The step itself (forward, backward, optimizer update, tally) is :func:`vaelib.training.train_step`, the same
function the eager loop runs; :class:`GraphStepper` only decides where its inputs live and how it is launched.

What a replay does and does not do (why ``fit(fast="auto")`` uses it only for models built by ``build_vae``): it
re-launches the recorded kernels on the recorded memory and runs no Python. Forward hooks, Python counters,
``.item()`` and anything decided on the host are frozen at capture. Random numbers are not: PyTorch's graph-safe
generator hands every replay a fresh offset, so each replay draws new noise (tests/test_training.py checks this on
a GPU). Inside the graph nothing may depend on host values: the batch is gathered with ``index_select`` from a
device-side permutation at a device-side step counter that the graph increments itself, and beta is a device
tensor. The last, partial batch of an epoch (another shape) runs eagerly through the same step.

The CUDA calls are the methods ``_on_device``, ``_side_stream``, ``_record`` and ``_synchronize``, so that the
logic around them can be checked on a CPU with those replaced (tests/test_training.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: Eager steps run before capture: the first builds the optimizer state and lazy kernels (and compiles a
#: torch.compile'd loss), the later ones let the caching allocator settle; all are undone after capture.
WARMUP_STEPS = 3

Step = Callable[[Tensor, Tensor, Tensor, Tensor, "Tensor | int"], None]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of the whole model state (parameters and buffers) and of the optimizer's per-parameter state."""
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = {p: {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in st.items()}
                 for p, st in opt.state.items()}
    return model_state, opt_state


@torch.no_grad()
def _restore(model: nn.Module, opt: torch.optim.Optimizer, snapshot: tuple[dict, dict]) -> None:
    """Put back a :func:`_snapshot` in place: a captured graph keeps reading and writing the same tensors."""
    model_state, opt_state = snapshot
    model.load_state_dict(model_state)  # copy_ into the existing parameters and buffers
    for p, st in opt.state.items():
        saved = opt_state.get(p, {})
        for key, value in st.items():
            if isinstance(value, Tensor):
                if key in saved:
                    value.copy_(saved[key])
                else:
                    value.zero_()  # created by the warm-up of a fresh optimizer: Adam's zero moments and step
            elif key in saved:
                st[key] = saved[key]


class GraphStepper:
    """``step(xb, beta, acc, bad, step_index)`` captured as one CUDA graph over a static batch buffer.

    ``data`` is the buffer the graph reads (dynamic binarisation redraws it in place); it must hold real data
    before :meth:`capture`, since the warm-up trains on it. :meth:`capture` leaves the model, its buffers and the
    optimizer exactly as it found them and the model in train mode; it draws random numbers (the warm-up's noise),
    so call it before seeding the run.
    """

    def __init__(self, step: Step, model: nn.Module, opt: torch.optim.Optimizer, data: Tensor, batch_size: int,
                 device: torch.device):
        self.step, self.model, self.opt, self.data = step, model, opt, data
        self.batch_size, self.device = batch_size, device
        n = len(data)
        self.n_full = n // batch_size
        self.perm = torch.arange(n, device=device)
        self.counter = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(batch_size, device=device)
        self.beta = torch.zeros((), device=device)
        self.acc = torch.zeros(2, device=device, dtype=torch.float64)
        self.bad = torch.full((), -1, dtype=torch.long, device=device)
        self.graph = None
        self.replay: Callable[[], None] | None = None
        self.capture_seconds = 0.0

    def _body(self) -> None:
        """What the graph records: gather the batch at the device-side counter, step, advance the counter."""
        idx = self.perm.index_select(0, self.counter * self.batch_size + self.offsets)
        self.step(self.data.index_select(0, idx), self.beta, self.acc, self.bad, self.counter)
        with torch.no_grad():
            self.counter += 1

    def _reset(self) -> None:
        self.counter.zero_()
        self.acc.zero_()
        self.bad.fill_(-1)

    def capture(self) -> None:
        """Warm up, record, then undo the warm-up. On failure the state is restored before the error propagates."""
        if self.n_full == 0:
            return  # fewer examples than one batch: every step runs eagerly
        t0 = time.perf_counter()
        self.model.train()  # a replay runs the mode it was captured in
        snapshot = _snapshot(self.model, self.opt)
        try:
            with self._on_device():
                with self._side_stream():
                    for _ in range(WARMUP_STEPS):
                        self.counter.zero_()  # stay on the first batch: the data may hold fewer batches
                        self.opt.zero_grad(set_to_none=True)
                        self._body()
                # Grads None: backward inside the graph allocates them from the graph's pool and writes them,
                # so no zeroing kernel is needed per replay.
                self.opt.zero_grad(set_to_none=True)
                self.replay = self._record()
        except BaseException:
            self.replay = self.graph = None
            _restore(self.model, self.opt, snapshot)
            self.opt.zero_grad(set_to_none=True)
            self._reset()
            try:  # a failed capture can leave an asynchronous error behind; the restore above comes first
                self._synchronize()
            except Exception:  # noqa: BLE001 - the capture error is the one to report
                pass
            raise
        self._synchronize()
        _restore(self.model, self.opt, snapshot)
        self._reset()
        self.capture_seconds = time.perf_counter() - t0

    def run_epoch(self, data: Tensor, perm: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """One epoch over ``perm``: the full batches by replay, the rest eagerly; returns (sums, first bad step)."""
        with self._on_device():
            if data.data_ptr() != self.data.data_ptr():
                self.data.copy_(data)
            self.perm.copy_(perm, non_blocking=True)
            self._reset()
            self.beta.fill_(beta)
            n_graph = self.n_full if self.replay is not None else 0
            for _ in range(n_graph):
                self.replay()
            rest = self.perm[n_graph * self.batch_size:]
            for step_index, idx in enumerate(rest.split(self.batch_size) if len(rest) else (), start=n_graph):
                # Zero in place (not None): the grads are the graph's static buffers.
                self.opt.zero_grad(set_to_none=False)
                self.step(self.data.index_select(0, idx), self.beta, self.acc, self.bad, step_index)
            return self.acc.clone(), self.bad.clone()

    # ------------------------------------------------------------------ the CUDA calls (replaced in CPU tests)
    def _on_device(self):
        """Capture and replay on the model's device, whichever device is current."""
        return torch.cuda.device(self.device)

    @contextlib.contextmanager
    def _side_stream(self):
        """Warm-up on a side stream, as capture requires (torch.cuda.graphs' make_graphed_callables does the same)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                yield
        finally:
            torch.cuda.current_stream(self.device).wait_stream(side)

    def _record(self) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device)):
            self._body()
        self.graph = graph
        return graph.replay

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


__all__ = ["WARMUP_STEPS", "GraphStepper"]
