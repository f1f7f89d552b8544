"""Run-wide switches: quick mode, device selection, where a model lives, the CPU thread count and the CPU's
handling of subnormal floats."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from vaelib.errors import VaelibError

#: Environment variable that shrinks every notebook's workload (CI sets it; stored outputs come from full runs).
QUICK_ENV = "VAELIB_QUICK"


def quick_mode() -> bool:
    """True when ``$VAELIB_QUICK`` is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pick(full, quick):
    """Return ``quick`` in quick mode, ``full`` otherwise: one line per workload knob in the notebooks."""
    return quick if quick_mode() else full


#: Environment variable naming the device that ``select_device()`` (no argument) returns, e.g. "cpu": the test
#: suite sets it so that it runs the same on a GPU machine; a reader can set it to keep a GPU runtime on the CPU.
DEVICE_ENV = "VAELIB_DEVICE"


class DeviceUnavailableError(VaelibError, ValueError):
    """The requested device does not exist on this machine; the message names the ones that do."""


def _mps_available() -> bool:
    """Apple's MPS backend is present (older torch builds have no torch.backends.mps at all)."""
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def available_devices() -> list[str]:
    """The devices this machine offers, e.g. ["cpu", "cuda:0", "cuda:1"]."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def _check_available(device: torch.device) -> torch.device:
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        ok = torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    elif device.type == "mps":
        ok = _mps_available()
    else:
        return device  # other backends (xpu, ...): torch itself says whether they work
    if not ok:
        raise DeviceUnavailableError(f"device {str(device)!r} is not available here; available: "
                                     f"{', '.join(available_devices())}")
    return device


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: an explicit choice wins, then ``$VAELIB_DEVICE``, else CUDA, then Apple's MPS, then
    the CPU. A device that is not there raises :class:`DeviceUnavailableError` naming the available ones."""
    if device is None:
        device = os.environ.get(DEVICE_ENV, "").strip() or None
    if device is not None:
        try:
            chosen = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise DeviceUnavailableError(f"not a device: {device!r} ({err}); available: "
                                         f"{', '.join(available_devices())}") from None
        return _check_available(chosen)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


#: Environment variable overriding :func:`set_cpu_threads`'s choice, e.g. VAELIB_THREADS=4 on an idle many-core
#: machine.
THREADS_ENV = "VAELIB_THREADS"


def set_cpu_threads(device: torch.device | str | None = None, threads: int | None = None) -> int:
    """Give torch one intra-op CPU thread (or ``threads``, or ``$VAELIB_THREADS``) when ``device`` is the CPU; a
    GPU run is left alone. Returns torch's thread count.

    Why one: torch splits every matrix product, and every elementwise op on more than ~32,000 numbers, across its
    threads, and each such op ends at a barrier where the threads wait for the slowest. The book's networks are
    small (a step of the 784-400-20 VAE is ~40 such ops of a few hundred microseconds), so when other processes
    share the cores (CI's two cores, a laptop's browser, Colab's two vCPUs) a thread the scheduler has set aside
    stalls every op: 100 steps under a load of about 3.5 on two cores took 21 s with two threads and 1.1 s with
    one (torch.profiler, the matrix products alone 20x slower). On an idle machine two threads would make the
    products ~1.5x faster, which is what ``$VAELIB_THREADS`` is for; several models are trained faster as one
    process per core (:func:`vaelib.training.fit_many`).
    """
    device = select_device(device)
    if device.type == "cpu":
        chosen = threads or int(os.environ.get(THREADS_ENV, "").strip() or 1)
        if chosen < 1:
            raise ValueError(f"the thread count must be >= 1, got {chosen}")
        torch.set_num_threads(chosen)
    return torch.get_num_threads()


def _flushing_denormals() -> bool:
    """Whether the calling thread flushes subnormal floats to zero: 1e-39 (float32's subnormal range) times one."""
    return (torch.full((1,), 1e-39) * 1.0).item() == 0.0


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime that torch's CPU ops run on, if it exposes ``GOMP_parallel`` (libgomp on Linux; LLVM's
    libomp, macOS's, exports it too), else None."""
    candidates = []
    with contextlib.suppress(OSError):  # Linux: the libraries this process has mapped
        with open("/proc/self/maps") as maps:
            candidates += sorted({line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]})
    candidates += sorted(str(p) for p in Path(torch.__file__).parent.joinpath("lib").glob("lib*omp*"))
    for path in candidates:
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "GOMP_parallel"):
                return lib
    return None


def _set_flush_denormal_everywhere(on: bool, threads: int) -> None:
    """Flush subnormals (FTZ/DAZ) or not, on the calling thread and on ``threads`` intra-op threads: the mode is
    a per-thread CPU flag, and torch.set_flush_denormal sets only the caller's, so it runs once more inside an
    OpenMP parallel region of that many threads. Threads created later copy their creator's flag."""
    torch.set_flush_denormal(on)
    runtime = _openmp_runtime() if threads > 1 else None
    if runtime is None:
        return
    each_thread = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(on))
    runtime.GOMP_parallel(each_thread, None, ctypes.c_uint(threads), ctypes.c_uint(0))


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Within the block, subnormal float32/float64 results and inputs count as zero on the CPU, on every intra-op
    thread; the previous mode is restored after.

    Why: a number below the smallest normal float (1.2e-38 in float32) takes a slow path in the CPU's arithmetic,
    some 100 times slower per operation. Training meets them in Adam: a parameter whose gradient stays zero (a
    dead ReLU unit, a pixel that is never on) has a first moment that shrinks by 0.9 per step, through the
    subnormal range after ~800 steps. At epoch 5 of the 784-400-20 VAE, 44 % of the first layer's moments were
    subnormal and the fused Adam step took 1.24 ms instead of 0.34 ms (torch.profiler, 2 threads), a quarter of
    the epoch. Their contribution to an update is below 1e-30, far under a float32 parameter's rounding.
    Evaluation meets them in a confident Bernoulli decoder: a logit of -100 puts exp(-100) = 3.7e-44 into the
    log-sigmoid, and IWAE (k = 5000) on the mlp20 reference model ran 1.4 times faster with them flushed. fit (on
    the CPU), :func:`vaelib.evaluation.iwae_bounds`, :func:`~vaelib.evaluation.evaluate_elbo` and AIS run inside
    this block; the flag is the CPU's, so it changes nothing on a GPU.
    """
    if not enabled:
        yield
        return
    before, threads = _flushing_denormals(), torch.get_num_threads()
    _set_flush_denormal_everywhere(True, threads)
    try:
        yield
    finally:
        if not before:  # every thread the block may have used: those at entry, and any added since
            _set_flush_denormal_everywhere(False, max(threads, torch.get_num_threads()))


def model_device(module: nn.Module) -> torch.device:
    """Where a model's parameters (else its buffers) live; the CPU for a module with neither."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def model_dtype(module: nn.Module) -> torch.dtype | None:
    """The floating-point dtype of a model's parameters (None for a module without parameters)."""
    p = next(module.parameters(), None)
    return None if p is None else p.dtype


def describe_run() -> str:
    """One line saying which device and which mode produced a notebook's outputs."""
    dev = select_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mode = "quick" if quick_mode() else "full"
    return f"device: {dev.type} [{name}], mode: {mode}, torch {torch.__version__}"
