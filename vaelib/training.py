"""Training: :func:`fit` (device choice, seeding, resident data, NaN detection, bit-for-bit resume).

What defines a run (epochs, lr, beta, objective...) is one :class:`vaelib.settings.TrainSettings`, checked once;
fit takes it, or builds it from the same names given as keywords.

One step, :func:`train_step` (forward, backward, optimizer update, tally), runs on every path: eagerly in
:func:`train_epoch` (pytorch/examples' ``train()``), or captured once as a CUDA graph and replayed
(:class:`vaelib.cuda_graph.GraphStepper`, ``fast="graph"``; what ``fast="auto"`` takes on CUDA for a plain
``build_vae`` model).

With ``out_dir``, fit writes a run directory (:mod:`vaelib.runs`: the checkpoint, history and run.json, the run
lock, the resume checks). Resuming restores the global torch RNG (CPU, and CUDA where used), the data-permutation
and binarisation generators, the optimizer state and the epoch, so ``fit(epochs=4)`` and ``fit(epochs=2)`` followed
by ``fit(epochs=4, resume=True)`` give identical parameters and history (tests/test_training.py checks it on the CPU,
for the eager and the CPU-stubbed graph path, and on CUDA where a GPU is present; tests/test_faults.py after
SIGINT, SIGTERM and SIGKILL). A graph is captured before seeding, so its warm-up's random numbers do not shift the
run's.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vaelib.config import flush_denormals, model_dtype, select_device
from vaelib.cuda_graph import GraphStepper
from vaelib.data import dynamic_binarize
from vaelib.errors import VaelibError, is_out_of_memory
from vaelib.evaluation import evaluate_elbo
from vaelib.models import VAE, Likelihood, build_vae, check_input
from vaelib.objectives import elbo, iwae_bound, kl_warmup
from vaelib.runs import CHECKPOINT_FORMAT, RunDirectory, check_resumable, clone_tree, data_fingerprint
from vaelib.settings import TrainSettings

FAST_MODES = ("auto", "eager", "graph", "compile", "graph-compile")
GRAPH_MODES = ("graph", "graph-compile")


class TrainingDivergedError(VaelibError, RuntimeError):
    """The loss became NaN or infinite; ``epoch``/``step`` say where, ``checkpoint`` is the last good one."""

    def __init__(self, message: str, epoch: int, step: int, checkpoint: Path | None, history: list[dict]):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint, self.history = epoch, step, checkpoint, history


class TrainingOutOfMemory(VaelibError, MemoryError):
    """Memory ran out during :func:`fit`; as after Ctrl-C, ``checkpoint`` (if any) resumes at the end of ``epoch``."""

    def __init__(self, message: str, epoch: int, checkpoint: Path | None, history: list[dict]):
        super().__init__(message)
        self.epoch, self.checkpoint, self.history = epoch, checkpoint, history


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`; ``checkpoint`` (if any) resumes at the end of epoch ``epoch``."""

    def __init__(self, message: str, epoch: int, checkpoint: Path | None, history: list[dict]):
        super().__init__(message)
        self.message, self.epoch, self.checkpoint, self.history = message, epoch, checkpoint, history

    def __str__(self) -> str:
        return self.message


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict]
    device: torch.device
    seconds_per_epoch: list[float]
    fast: str = "eager"
    out_dir: Path | None = None
    checkpoint: Path | None = None
    resumed_from: int = 0
    #: one-off seconds before the first epoch's steps: "capture" (CUDA-graph warm-up and capture, including the
    #: compilation under "graph-compile") and, under "compile", "compile" (the first, compiling call).
    setup_seconds: dict = field(default_factory=dict)
    tf32: bool = False

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        return (f"FitResult(epochs={len(self.history)}, device={self.device}, fast={self.fast!r}, "
                f"last={ {k: round(v, 3) if isinstance(v, float) else v for k, v in last.items()} })")


# ------------------------------------------------------------------------------------------------ validation
def _as_data(x, name: str, input_dim: int, dtype: torch.dtype, unit_interval: bool) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    check_input(x, input_dim, name)
    if len(x) == 0:
        raise ValueError(f"{name} is empty")
    x = x.to(dtype)
    lo, hi = x.min().item(), x.max().item()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if unit_interval and (lo < 0 or hi > 1):
        raise ValueError(f"{name} must lie in [0, 1] for this likelihood (found values in [{lo:.3g}, {hi:.3g}]); "
                         "use a Gaussian likelihood for other data")
    return x


def _fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether data of ``nbytes`` can stay on ``device`` (half the free memory at most)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < 0.5 * free
    return nbytes < 2 * 2**30  # MPS and others: no query; MNIST-size data (~200 MB) fits


def graph_safe(model: nn.Module) -> bool:
    """Whether a CUDA-graph replay can stand in for running ``model``'s Python: a VAE built by ``build_vae`` (only
    vaelib's and torch.nn's modules), with no hooks and no method replaced on an instance. A replay runs no Python,
    so hooks, Python-side counters and ``.item()`` would be frozen at capture."""
    if type(model) is not VAE or not getattr(model, "config", None):
        return False
    module_hooks = torch.nn.modules.module
    if any(getattr(module_hooks, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return False
    for m in model.modules():
        if not type(m).__module__.startswith(("vaelib.models", "torch.nn.")):
            return False
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
        if any(isinstance(v, types.FunctionType | types.MethodType | functools.partial) for v in vars(m).values()):
            return False
    return not any(getattr(p, "_backward_hooks", None) for p in model.parameters())


def _resolve_fast(fast, device: torch.device, resident: bool, custom_optimizer: bool, model: nn.Module) -> str:
    if fast is True:
        fast = "auto"
    if fast is False or fast is None:
        fast = "eager"
    if fast not in FAST_MODES:
        raise ValueError(f"fast must be one of {FAST_MODES} (or True/False), got {fast!r}")
    if fast == "auto":
        # CUDA graphs remove the per-kernel launch cost that bounds this small model; on the CPU there is no
        # launch cost to remove and compilation only adds time, so eager is the fast path there. Only a model
        # whose forward is plain tensor code is safe to replay (graph_safe).
        safe = device.type == "cuda" and resident and not custom_optimizer and graph_safe(model)
        return "graph" if safe else "eager"
    if fast in ("graph", "graph-compile"):
        why = ("it needs a CUDA device" if device.type != "cuda" else
               "it needs the data resident on the device" if not resident else
               "it needs vaelib's own (capturable) Adam" if custom_optimizer else "")
        if why:
            warnings.warn(f"fast={fast!r} is not available ({why}); training eagerly", stacklevel=3)
            return "eager"
    return fast


def _make_adam(model: nn.Module, lr: float, mode: str, scheduled: bool = False) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    if mode.startswith("graph"):
        # Captured inside the graph: the step counter must live on the device (capturable). The fused kernel
        # replaces ~a dozen foreach kernels per step; older torch versions without it fall back to foreach.
        # A float lr is baked into the captured kernels, so a schedule needs the lr as a device tensor that
        # _set_lr overwrites in place between replays.
        graph_lr = torch.tensor(lr, dtype=torch.float32, device=device) if scheduled else lr
        try:
            return torch.optim.Adam(params, lr=graph_lr, capturable=True, fused=True)
        except (RuntimeError, ValueError, TypeError):
            return torch.optim.Adam(params, lr=graph_lr, capturable=True, foreach=True)
    # One fused kernel per parameter instead of a dozen elementwise passes (each a pass over memory and, with
    # several threads, a parallel region): on the CUDA graph path's kernel uncaptured, so that every CUDA path
    # makes the same updates; on the CPU it took Adam from 33 % to 9 % of a 784-400-20 step (torch.profiler, 1 thread).
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a torch (or device) without the fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)


def lr_at_epoch(epoch: int, epochs: int, lr: float, lr_final: float | None) -> float:
    """The step size of ``epoch`` (1-based): constant ``lr``, or with ``lr_final`` a geometric decay from ``lr`` in
    the first epoch to ``lr_final`` in the last. A function of the epoch alone, so a resumed run follows it too."""
    if lr_final is None or epochs <= 1:
        return lr
    return lr * (lr_final / lr) ** ((epoch - 1) / (epochs - 1))


def _set_lr(opt: torch.optim.Optimizer, value: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(value)  # in place: a captured CUDA graph reads this tensor
        else:
            group["lr"] = value


def _load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state but keep this optimizer's implementation flags (capturable/fused/foreach),
    so a checkpoint from the CPU resumes on the CUDA-graph path and back."""
    flags = [{k: g.get(k) for k in ("capturable", "fused", "foreach")} for g in opt.param_groups]
    lrs = [g["lr"] for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, saved, lr in zip(opt.param_groups, flags, lrs, strict=True):
        group.update(saved)
        # Keep this optimizer's kind of lr: a device tensor on the graph path, a float elsewhere.
        value = float(group["lr"])
        if isinstance(lr, Tensor):
            group["lr"] = lr
            lr.fill_(value)
        else:
            group["lr"] = value
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "step" in st and isinstance(st["step"], Tensor):
                on_device = bool(saved.get("capturable") or saved.get("fused"))
                st["step"] = st["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ the step
def _batch_loss(model, xb: Tensor, beta, kl: str, objective: str = "elbo",
                k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The loss of one batch and the two sums the history tallies.

    ELBO: (mean of -(rec - beta * kl), sum of rec, sum of kl). IWAE: (mean of -L_k, sum of L_k, 0): the k-sample
    bound has no split into a reconstruction and a KL term.
    """
    if objective == "iwae":
        bound = iwae_bound(model, xb, k)
        return -bound.mean(), bound.sum(), bound.new_zeros(())
    terms = elbo(model, xb, beta=beta, kl=kl)
    return terms.loss(), terms.rec.sum(), terms.kl.sum()


#: torch.compile's backend for fast="compile"/"graph-compile" (tests use "eager" to skip code generation).
COMPILE_BACKEND = "inductor"


def _compiled_loss() -> tuple[Callable, dict]:
    """A torch.compile'd :func:`_batch_loss` of its own, and a dict that receives the seconds of its first call
    (the compilation). Dynamo keys its cache and its recompile limit on the code object, so compiling the
    module-level function would share one cache across every fit of a session; a copy of the code is new."""
    fresh = types.FunctionType(_batch_loss.__code__.replace(), _batch_loss.__globals__, "_batch_loss")
    compiled = torch.compile(fresh, dynamic=False, backend=COMPILE_BACKEND)
    timing: dict = {}

    def loss_fn(*args, **kwargs):
        if "compile" in timing:
            return compiled(*args, **kwargs)
        t0 = time.perf_counter()
        out = compiled(*args, **kwargs)
        timing["compile"] = time.perf_counter() - t0
        return out

    return loss_fn, timing


@torch.no_grad()
def _tally(acc: Tensor, bad: Tensor, loss: Tensor, rec_sum: Tensor, kl_sum: Tensor, step_index) -> None:
    """Add a batch's sums to ``acc`` and remember in ``bad`` the first step whose loss was not finite, all on the
    device (no host sync per step; ``step_index`` may be a device tensor, as inside a CUDA graph)."""
    acc += torch.stack([rec_sum.detach(), kl_sum.detach()])
    bad.copy_(torch.where((bad < 0) & ~torch.isfinite(loss.detach()), step_index, bad))


def train_step(model, opt, loss_fn, kl: str, xb: Tensor, beta: Tensor, acc: Tensor, bad: Tensor,
               step_index) -> None:
    """The training step, on every path: forward, backward, optimizer update, tally. Gradients are zero or None
    on entry (the eager loop zeroes them; inside a CUDA graph backward writes them afresh)."""
    loss, rec_sum, kl_sum = loss_fn(model, xb, beta, kl)
    loss.backward()
    opt.step()
    _tally(acc, bad, loss, rec_sum, kl_sum, step_index)


def _gather(data: Tensor, idx: Tensor, device: torch.device, out: Tensor | None = None) -> Tensor:
    """The batch ``data[idx]`` on ``device``, into ``out`` (a reused buffer of at least ``len(idx)`` rows) when
    given. Data kept on the host are gathered into pinned memory, so the copy to a GPU runs asynchronously (the
    caching host allocator keeps the block until the copy is done)."""
    if data.device == device:
        if out is not None:
            return torch.index_select(data, 0, idx, out=out[:len(idx)])
        return data.index_select(0, idx)
    if device.type == "cuda":
        out = torch.empty((len(idx), *data.shape[1:]), dtype=data.dtype, pin_memory=True)
        return torch.index_select(data, 0, idx, out=out).to(device, non_blocking=True)
    return data.index_select(0, idx).to(device)


def train_epoch(step, opt, data: Tensor, perm: Tensor, beta: float, batch_size: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """One epoch of eager training (pytorch/examples' ``train()``): the sums of rec and kl and the first step whose
    loss was not finite (-1: none), accumulated on the device (one host sync per epoch, in fit)."""
    acc = torch.zeros(2, device=device, dtype=torch.float64)
    bad = torch.full((), -1, dtype=torch.long, device=device)
    beta_t = torch.tensor(beta, device=device)
    # One batch buffer for the epoch: each step overwrites it (the previous step's backward is done with it).
    buffer = data.new_empty((batch_size, *data.shape[1:])) if data.device == device else None
    for step_index, idx in enumerate(perm.split(batch_size)):
        xb = _gather(data, idx, device, buffer)
        opt.zero_grad()
        step(xb, beta_t, acc, bad, step_index)
    return acc, bad


def _capture(step, model, opt, data: Tensor, batch_size: int, dev: torch.device, *, explicit: bool,
             make_eager_opt) -> tuple[GraphStepper | None, torch.optim.Optimizer]:
    """The graph stepper, captured, and its optimizer; or, if capture fails, None and an eager optimizer holding
    the same state (a warning under fast="auto"; under an explicit fast="graph"/"graph-compile", the error)."""
    graph = GraphStepper(step, model, opt, data, batch_size, dev)
    try:
        graph.capture()  # restores the model and optimizer before it raises
    except Exception as err:  # capture can fail on exotic models or drivers: stay correct, lose speed
        if explicit:
            raise RuntimeError(f"CUDA-graph capture failed ({type(err).__name__}: {err}); "
                               "train with fast='eager', or fast='auto', which falls back") from err
        warnings.warn(f"CUDA-graph capture failed ({type(err).__name__}: {err}); training eagerly", stacklevel=3)
        eager_opt = make_eager_opt()
        _load_optimizer_state(eager_opt, opt.state_dict())
        return None, eager_opt
    return graph, opt


# ------------------------------------------------------------------------------------------------ RNG state
def _rng_state(device: torch.device, perm_gen: torch.Generator, bin_gen: torch.Generator) -> dict:
    state = {"torch_cpu": torch.get_rng_state(), "perm": perm_gen.get_state(), "binarize": bin_gen.get_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device, perm_gen: torch.Generator, bin_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch_cpu"])
    perm_gen.set_state(state["perm"])
    bin_gen.set_state(state["binarize"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


# ------------------------------------------------------------------------------------------------------ fit
def fit(
    model: nn.Module,
    train_x: Tensor,
    test_x: Tensor | None = None,
    settings: TrainSettings | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    fast: str | bool = "auto",
    progress: bool = True,
    optimizer=None,
    resident: bool | None = None,
    run_info: dict | None = None,
    callback=None,
    tf32: bool | None = False,
    **setting_values,
) -> FitResult:
    """Train ``model`` on ``train_x`` (N, input_dim) by minimising -(rec - beta_t * kl), or -L_k, with Adam.

    settings: what defines the run (:class:`vaelib.settings.TrainSettings`: epochs, batch_size, lr, lr_final, beta,
      warmup_epochs, binarize, seed, kl, objective, k, checkpoint_every, eval_batch_size); or give those as keywords
      (``fit(model, x, epochs=5, lr=3e-4)``), which build it. Not both.
    device: None picks $VAELIB_DEVICE, else cuda > mps > cpu (:func:`vaelib.config.select_device`); a device that
      is not there is an error. train_x and test_x may live on any device.
    fast: "auto", "eager", "graph" (the step captured once as a CUDA graph and replayed, :mod:`vaelib.cuda_graph`),
      "compile" (torch.compile of the loss) or "graph-compile" (both; the fastest on a GPU, at a one-off compile
      cost). "auto" takes the graph on CUDA for a model built by :func:`vaelib.models.build_vae` with no hooks
      (:func:`graph_safe`) and eager otherwise: a replay runs no Python, so hooks, Python-side counters and
      ``.item()`` in a custom model would be frozen at capture. An explicit "graph" trusts the model; if its
      capture fails it raises, where "auto" warns and trains eagerly. Unavailable modes (no CUDA, data not
      resident, a custom optimizer) fall back to eager with a warning. ``FitResult.fast`` and run.json say which
      path ran.
    out_dir: run directory for checkpoints and history (:mod:`vaelib.runs`), locked while fit runs: a second
      writer gets RunLockedError. A directory that holds a run is refused (RunExistsError) unless resume=True
      continues it — with the same settings, all but epochs and checkpoint_every (RunMismatchError otherwise) —
      or overwrite=True replaces it (the old run's files go once the new run's first checkpoint is written).
    optimizer: optional ``params -> torch.optim.Optimizer`` factory replacing Adam(lr).
    resident: keep the data on the device (default: when it fits, which MNIST-size data does); data kept on the
      host reach a GPU through pinned memory.
    run_info: what the run was trained on (data set, options...), recorded in run.json and the checkpoint.
    callback: optional ``callback(row, model)`` called after each epoch with its history row.
    tf32: TF32 for float32 matmuls and cuDNN convolutions on CUDA, the same on every path (default off: float32
      throughout, so the paths and the CPU agree to float32 rounding; on for ~15 % more speed on the graph path).
      Both flags are restored when fit returns or raises. On the CPU, fit flushes subnormal floats to zero
      (:func:`vaelib.config.flush_denormals`: Adam's decaying moments would otherwise slow its steps), restored too.
    Raises TrainingDivergedError on a NaN/inf loss, or when an epoch leaves NaN/inf parameters, Adam moments or
    test ELBO (the model is restored to the last good epoch, and nothing non-finite is saved; resume=True may then
    continue with a smaller lr), TrainingInterrupted (a KeyboardInterrupt) on Ctrl-C and TrainingOutOfMemory when
    memory runs out, both after saving a resumable checkpoint.
    """
    _check_model(model)
    s = _settings(settings, setting_values).for_model(model)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the run directory to resume)")
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other")
    train_x, test_x = _check_data(model, train_x, test_x, s.binarize)
    dev = select_device(device)
    model.to(dev)
    n_train = len(train_x)
    train_data, data_dev, perm_gen, bin_gen = _place_data(train_x, dev, resident, s)
    mode = _resolve_fast(fast, dev, data_dev == dev, optimizer is not None, model)
    if mode in GRAPH_MODES and n_train < s.batch_size:
        mode = "eager" if mode == "graph" else "compile"  # not one full batch to capture
    opt = optimizer(model.parameters()) if optimizer is not None else _make_adam(
        model, s.lr, mode, scheduled=s.lr_final is not None)
    config = dict(getattr(model, "config", {}) or {})
    recorded = s.recorded(n_train=n_train, data=data_fingerprint(train_x),
                          optimizer="adam" if optimizer is None else "custom")
    # The run directory is locked from here to the end: one writer per run.
    # On the CPU, subnormal floats count as zero while fit trains (vaelib.config.flush_denormals says why).
    with (RunDirectory(out_dir, resume=resume, overwrite=overwrite) as run, _tf32(bool(tf32)),
          flush_denormals(dev.type == "cpu")):
        ckpt = run.open()
        history, start_epoch = _restore(ckpt, model, opt, config, recorded, own_adam=optimizer is None)
        # The buffer the steps read: dynamic binarisation redraws it in place each epoch. It starts as the grey
        # data, so that a capture's warm-up trains on real values. (TF32 is set before capture: the captured
        # kernels keep the math mode they were recorded with.)
        binarized = train_data.clone() if s.binarize else train_data
        mode, opt, step, graph, compile_timing = _step_path(mode, model, opt, s, binarized, dev,
                                                            explicit=fast in GRAPH_MODES)
        torch.manual_seed(s.seed)
        if ckpt is not None:
            _set_rng_state(ckpt["rng"], dev, perm_gen, bin_gen)
        setup_seconds = {"capture": graph.capture_seconds if graph is not None else 0.0}

        def checkpoint_state(epoch: int) -> dict:
            return {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "model_state": model.state_dict(),
                "model_config": config, "optimizer_state": opt.state_dict(),
                "rng": _rng_state(dev, perm_gen, bin_gen), "history": history, "settings": recorded,
                "run_info": run_info or {},
            }

        def run_json() -> dict:
            return {"model_config": config, "settings": recorded, "run_info": run_info or {}, "device": str(dev),
                    "torch": torch.__version__, "fast": mode, "tf32": bool(tf32),
                    "setup_seconds": {**setup_seconds, **compile_timing}}

        # A new run's epoch-0 checkpoint: an interrupt in epoch 1 resumes from it.
        run.begin(checkpoint_state(0) if ckpt is None else None, run_json(), history)
        seconds: list[float] = []
        bar = _progress_bar(progress, start_epoch, s.epochs)
        try:
            for epoch in range(start_epoch + 1, s.epochs + 1):
                good_params = clone_tree(model.state_dict())
                beta_e = kl_warmup(epoch, s.warmup_epochs, s.beta)
                lr_e = _epoch_lr(opt, s, epoch)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                perm = torch.randperm(n_train, generator=perm_gen).to(data_dev, non_blocking=True)
                if s.binarize:
                    dynamic_binarize(train_data, bin_gen, out=binarized)
                model.train()
                if graph is not None:
                    acc, bad = graph.run_epoch(binarized, perm, beta_e)
                else:
                    acc, bad = train_epoch(step, opt, binarized, perm, beta_e, s.batch_size, dev)
                acc_host, bad_step = acc.tolist(), int(bad.item())  # the one host sync per epoch
                seconds.append(time.perf_counter() - t0)
                diverged = functools.partial(_diverged, model, good_params, run, history, epoch,
                                             math.ceil(n_train / s.batch_size), lr_e, beta_e)
                if bad_step >= 0 or not all(math.isfinite(v) for v in acc_host):
                    raise diverged(bad_step)
                row = _train_row(epoch, acc_host, n_train, s.objective, beta_e)
                if test_x is not None:
                    model.eval()
                    ev = evaluate_elbo(model, test_x, batch_size=s.eval_batch_size, kl=s.kl)
                    row.update(test_elbo=ev["elbo"], test_rec=ev["rec"], test_kl=ev["kl"])
                broken = _nonfinite_after_epoch(model, opt, row)
                if broken:  # the epoch's last updates diverged though every step's loss was finite
                    raise diverged(-1, broken)
                row.update(beta=beta_e, lr=lr_e, seconds=seconds[-1])
                history.append(row)
                _show_progress(bar, row)
                run.end_of_epoch(functools.partial(checkpoint_state, epoch),
                                 due=epoch % s.checkpoint_every == 0 or epoch == s.epochs)
                if callback is not None:
                    callback(row, model)
            if compile_timing:
                run.write_run_json(run_json())  # now with the compile seconds
        except (KeyboardInterrupt, MemoryError, RuntimeError) as stop:  # Ctrl-C (the CLI turns SIGTERM into it)
            if not isinstance(stop, KeyboardInterrupt) and not is_out_of_memory(stop):
                raise
            raise _stopped(stop, run, history) from (None if isinstance(stop, KeyboardInterrupt) else stop)
        finally:
            if bar is not None:
                bar.close()
    model.eval()
    return FitResult(model=model, history=history, device=dev, seconds_per_epoch=seconds, fast=mode,
                     out_dir=run.path, checkpoint=run.checkpoint, resumed_from=start_epoch,
                     setup_seconds={**setup_seconds, **compile_timing}, tf32=bool(tf32))


# ------------------------------------------------------------------------------------------------ fit's parts
def _settings(settings: TrainSettings | None, values: dict) -> TrainSettings:
    """The run's settings: ``settings``, or built from fit's setting keywords (not both)."""
    unknown = [name for name in values if name not in TrainSettings.names()]
    if unknown:
        raise TypeError(f"fit() got an unexpected keyword argument {unknown[0]!r}")
    if settings is None:
        return TrainSettings(**values)
    if not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, got {type(settings).__name__}")
    if values:
        raise TypeError(f"fit() got settings and the setting keywords {', '.join(values)}: give one or the other "
                        "(settings.replace(...) makes a changed copy)")
    return settings


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "encoder") or not hasattr(model, "decoder"):
        raise TypeError(f"model must be a VAE-like nn.Module with .encoder/.decoder/.prior, got {type(model).__name__}")


def _check_data(model: nn.Module, train_x, test_x, binarize: bool) -> tuple[Tensor, Tensor | None]:
    """train_x and test_x as tensors of the model's dtype, checked (shape, finite, [0, 1] where the likelihood or
    the binarisation needs it)."""
    input_dim = getattr(model, "input_dim", None) or model.encoder.input_dim
    likelihood = getattr(model.decoder, "likelihood", None)
    unit = binarize or (isinstance(likelihood, Likelihood) and likelihood.support == "unit-interval")
    train_x = _as_data(train_x, "train_x", input_dim, model_dtype(model), unit)
    if test_x is not None:
        test_x = _as_data(test_x, "test_x", input_dim, model_dtype(model), unit)
    return train_x, test_x


def _place_data(train_x: Tensor, dev: torch.device, resident: bool | None,
                s: TrainSettings) -> tuple[Tensor, torch.device, torch.Generator, torch.Generator]:
    """The training data where the steps read them and that device (``dev`` when resident, which by default they
    are when they fit), and the generators of the data permutation and the binarisation, seeded."""
    if resident is None:
        resident = _fits_on(dev, train_x.element_size() * train_x.numel() * (2 if s.binarize else 1))
    data_dev = dev if resident else torch.device("cpu")
    perm_gen = torch.Generator().manual_seed(s.seed)
    try:
        bin_gen = torch.Generator(device=data_dev).manual_seed(s.seed + 1)
    except RuntimeError:  # a backend without its own generators: keep the data on the host and binarise there
        data_dev = torch.device("cpu")
        bin_gen = torch.Generator().manual_seed(s.seed + 1)
    return train_x.to(data_dev), data_dev, perm_gen, bin_gen


def _restore(ckpt: dict | None, model: nn.Module, opt: torch.optim.Optimizer, config: dict, recorded: dict,
             own_adam: bool) -> tuple[list[dict], int]:
    """A resumed run's history and epoch, after checking that it is the same run and loading its model and
    optimizer states; ([], 0) for a new run."""
    if ckpt is None:
        return [], 0
    check_resumable(ckpt, config, recorded)
    # Before capture: the graph records the addresses of these parameters and optimizer-state tensors.
    model.load_state_dict(ckpt["model_state"])
    _load_optimizer_state(opt, ckpt["optimizer_state"])
    if own_adam:
        _set_lr(opt, recorded["lr"])  # the lr a resume may lower (check_resumable), not the one saved with Adam's
    return list(ckpt["history"]), int(ckpt["epoch"])


def _step_path(mode: str, model: nn.Module, opt: torch.optim.Optimizer, s: TrainSettings, data: Tensor,
               dev: torch.device, explicit: bool):
    """The training step for ``mode``: (mode, opt, step, graph, compile_timing). The objective is fixed for the run:
    bound into the loss, so that every path (eager, graph, compiled) runs the same one. IWAE's loss is plain tensor
    code too, so a CUDA graph can capture it. A failed capture falls back to eager (mode "eager", graph None)."""
    eager_loss = functools.partial(_batch_loss, objective=s.objective, k=s.k)
    loss_fn, compile_timing = _compiled_loss() if mode.endswith("compile") else (_batch_loss, {})
    loss_fn = functools.partial(loss_fn, objective=s.objective, k=s.k)
    step = functools.partial(train_step, model, opt, loss_fn, s.kl)
    graph = None
    if mode.startswith("graph"):
        # Before seeding (and before restoring a checkpoint's RNG state): the warm-up draws noise, and the
        # run's random numbers must not depend on it, so that a resumed run continues exactly.
        graph, opt = _capture(step, model, opt, data, s.batch_size, dev, explicit=explicit,
                              make_eager_opt=lambda: _make_adam(model, s.lr, "eager"))
        if graph is None:
            mode, step = "eager", functools.partial(train_step, model, opt, eager_loss, s.kl)
    return mode, opt, step, graph, compile_timing


def _epoch_lr(opt: torch.optim.Optimizer, s: TrainSettings, epoch: int) -> float:
    """Set the schedule's lr for ``epoch`` (with lr_final), and return the lr the epoch trains with."""
    if s.lr_final is None:
        return float(opt.param_groups[0]["lr"])  # also a custom optimizer's own lr
    lr = lr_at_epoch(epoch, s.epochs, s.lr, s.lr_final)  # the schedule's value, not a float32 copy
    _set_lr(opt, lr)
    return lr


def _train_row(epoch: int, sums: list[float], n_train: int, objective: str, beta: float) -> dict:
    """An epoch's history row from the tally's two sums."""
    rec_mean, kl_mean = sums[0] / n_train, sums[1] / n_train
    if objective == "iwae":  # the tally's first sum is L_k's
        return {"epoch": epoch, "train_loss": -rec_mean, "train_iwae_bound": rec_mean}
    return {"epoch": epoch, "train_loss": -(rec_mean - beta * kl_mean), "train_rec": rec_mean, "train_kl": kl_mean}


def _show_progress(bar, row: dict) -> None:
    if bar is None:
        return
    post = {"loss": f"{row['train_loss']:.2f}"}
    if "train_kl" in row:
        post["kl"] = f"{row['train_kl']:.2f}"
    if "test_elbo" in row:
        post["test_elbo"] = f"{row['test_elbo']:.2f}"
    bar.set_postfix(post)
    bar.update(1)


def _stopped(stop: BaseException, run: RunDirectory, history: list[dict]) -> BaseException:
    """After Ctrl-C (or SIGTERM) or out of memory: the pending epoch saved, the error that says where it is."""
    saved_epoch = run.flush()
    if not isinstance(stop, KeyboardInterrupt):  # out of memory: saved alike, resumable with less
        return TrainingOutOfMemory(
            f"out of memory in epoch {len(history) + 1}; " + (
                f"a resumable checkpoint of epoch {saved_epoch} is in {run.checkpoint}" if run.checkpoint
                else "nothing saved (no out_dir)"), saved_epoch, run.checkpoint, history)
    if run.checkpoint is not None:
        msg = (f"training interrupted during epoch {len(history) + 1}; a resumable checkpoint of epoch "
               f"{saved_epoch} is in {run.checkpoint}; continue with resume=True (CLI: --resume)")
    else:
        msg = f"training interrupted during epoch {len(history) + 1}; nothing saved (no out_dir)"
    return TrainingInterrupted(msg, saved_epoch, run.checkpoint, history)


def _nonfinite_after_epoch(model: nn.Module, opt: torch.optim.Optimizer, row: dict) -> str:
    """What an epoch left NaN or infinite ("" if nothing): its parameters, the optimizer's moments or its history
    row (the test ELBO). Finite losses in every step do not prove it: the last step's update is only seen by the
    next forward pass (here, the test set's)."""
    with torch.no_grad():
        params = [p.detach() for p in model.parameters()]
        moments = [v for st in opt.state.values() for v in st.values() if isinstance(v, Tensor) and v.dim() > 0]
        if not bool(torch.stack([torch.isfinite(t).all() for t in params]).all()):  # one host sync
            return "the parameters"
        if moments and not bool(torch.stack([torch.isfinite(t).all().to(params[0].device) for t in moments]).all()):
            return "the optimizer's moments"
    return ", ".join(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))


# ------------------------------------------------------------------------------------------------- fit_many
#: (train_x, test_x, common) of the running fit_many: forked workers inherit it, spawned ones receive it once.
_SHARED: tuple = ()


def _share(*shared) -> None:
    global _SHARED
    _SHARED = shared


def _fit_job(job: dict) -> dict:
    """One job of :func:`fit_many`, in a worker process on one thread: build, train, return the model's state as
    bytes (tensors pickled back through torch's shared-memory handles would need the exiting worker alive)."""
    train_x, test_x, common = _SHARED
    torch.set_num_threads(1)
    kwargs = {**common, **{k: v for k, v in job.items() if k not in ("model", "init_seed")}}
    try:
        if kwargs.get("settings") is not None:  # a job's setting keywords change the common settings
            changes = {name: kwargs.pop(name) for name in TrainSettings.names() if name in kwargs}
            kwargs["settings"] = kwargs["settings"].replace(**changes)
        torch.manual_seed(job.get("init_seed", 0))
        model = build_vae(**job.get("model", {}))
        result = fit(model, train_x, test_x, device="cpu", progress=False, **kwargs)
    except Exception as err:  # exceptions with their own constructors do not all survive pickling: send the text
        return {"error": f"{type(err).__name__}: {err}"}
    state = io.BytesIO()
    torch.save(result.model.state_dict(), state)
    return {"config": model.config, "state": state.getvalue(), "history": result.history,
            "seconds": result.seconds_per_epoch, "fast": result.fast, "out_dir": result.out_dir,
            "checkpoint": result.checkpoint, "resumed_from": result.resumed_from,
            "setup_seconds": result.setup_seconds}


def fit_many(jobs: list[dict], train_x: Tensor, test_x: Tensor | None = None, *, processes: int | None = None,
             **common) -> list[FitResult]:
    """Train independent models at once on the CPU, one worker process per core, each on one thread.

    jobs: one dict per model: ``model`` (:func:`vaelib.models.build_vae`'s arguments), ``init_seed`` (the seed
      its initial weights are drawn with, default 0) and any of :func:`fit`'s keyword arguments, which override
      those given here in ``common`` (e.g. ``[{"beta": b} for b in betas]`` with ``epochs=20``; with
      ``settings=TrainSettings(epochs=20)`` in common, a job's setting keywords replace its fields). A job with an
      ``out_dir`` writes its run there as fit does.
    processes: worker processes (default: one per CPU core this process may use, at most one per job); 1 trains
      the jobs one after the other in this process.
    Returns one :class:`FitResult` per job, in order, its model rebuilt on the CPU. A job that fails raises a
    VaelibError naming it (after the other jobs finish).

    Why processes: one small model cannot keep two cores busy (its ops, split across threads, wait for each other
    at every barrier; :func:`vaelib.config.set_cpu_threads`), but two models in two processes never wait for each
    other. Each job's result is the one ``fit`` gives alone with the same seeds on one thread.
    """
    if not jobs:
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = min(len(jobs), processes or cores)
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    threads = torch.get_num_threads()
    _share(train_x, test_x, common)
    try:
        if processes == 1:
            outputs = [_fit_job(job) for job in jobs]
        else:
            import multiprocessing

            # fork hands the data to the workers without copying it (each sets one thread before any op runs);
            # where fork is missing (macOS, Windows), spawn sends it to each worker once.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            initargs = () if method == "fork" else (train_x, test_x, common)
            with multiprocessing.get_context(method).Pool(processes, initializer=_share if initargs else None,
                                                          initargs=initargs) as pool:
                outputs = pool.map(_fit_job, jobs, chunksize=1)
    finally:
        _share()
        torch.set_num_threads(threads)
    failed = [f"job {i}: {out['error']}" for i, out in enumerate(outputs) if "error" in out]
    if failed:
        raise VaelibError("fit_many: " + "; ".join(failed))
    results = []
    for out in outputs:
        model = build_vae(**out["config"])
        model.load_state_dict(torch.load(io.BytesIO(out["state"]), weights_only=True))
        model.eval()
        results.append(FitResult(model=model, history=out["history"], device=torch.device("cpu"),
                                 seconds_per_epoch=out["seconds"], fast=out["fast"], out_dir=out["out_dir"],
                                 checkpoint=out["checkpoint"], resumed_from=out["resumed_from"],
                                 setup_seconds=out["setup_seconds"]))
    return results


def _diverged(model: nn.Module, good_params: dict, run: RunDirectory, history: list[dict], epoch: int, n_steps: int,
              lr: float, beta: float, bad_step: int, broken: str = "") -> TrainingDivergedError:
    """Restore the model to the end of the last good epoch, save that epoch if it was still pending, and say what
    diverged where."""
    model.load_state_dict(good_params)
    run.flush()
    if broken:
        what = f"the updates of epoch {epoch} left {broken} NaN or infinite"
    else:
        step_txt = f"step {bad_step + 1} of {n_steps}" if bad_step >= 0 else "an unknown step"
        what = f"the loss became NaN or infinite in epoch {epoch}, {step_txt}"
    # beta beyond float32's range is infinite in the loss itself; a large beta is as likely a cause as the lr
    advice = ("Use a smaller beta (it exceeds float32's range)" if beta > torch.finfo(torch.float32).max else
              "Try a smaller learning rate or beta" if beta > 1 else "Try a smaller learning rate")
    return TrainingDivergedError(
        f"training diverged: {what} (lr={lr:g}, beta={beta:g}); the model was restored to the end of epoch "
        f"{epoch - 1}; last good checkpoint: {run.where()}. {advice}.", epoch, bad_step + 1, run.checkpoint, history)


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 for float32 matmuls and cuDNN convolutions (both flags) inside the block, restored after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _progress_bar(progress: bool, start: int, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="epoch")


__all__ = ["FAST_MODES", "GRAPH_MODES", "FitResult", "TrainSettings", "TrainingDivergedError", "TrainingInterrupted",
           "TrainingOutOfMemory", "fit", "fit_many",
           "graph_safe", "lr_at_epoch", "train_epoch", "train_step"]
