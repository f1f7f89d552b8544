"""Run-wide switches: quick mode and device selection."""

from __future__ import annotations

import os

import torch

#: Environment variable that shrinks every notebook's workload (CI sets it; stored outputs come from full runs).
QUICK_ENV = "VAELIB_QUICK"


def quick_mode() -> bool:
    """True when ``$VAELIB_QUICK`` is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pick(full, quick):
    """Return ``quick`` in quick mode, ``full`` otherwise: one line per workload knob in the notebooks."""
    return quick if quick_mode() else full


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: an explicit choice wins, else CUDA, then Apple's MPS, then the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_run() -> str:
    """One line saying which device and which mode produced a notebook's outputs."""
    dev = select_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mode = "quick" if quick_mode() else "full"
    return f"device: {dev.type} [{name}], mode: {mode}, torch {torch.__version__}"
