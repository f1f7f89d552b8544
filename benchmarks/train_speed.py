"""Training speed: a tutorial-style DataLoader loop against vaelib's trainer, same data, model and loss.

Setting (one process, one device): Fashion-MNIST, 784-400-20 MLP (ReLU; Bernoulli decoder, sigmoid mean),
batch 128, Adam 1e-3, BCE + analytic KL, dynamically (default) or statically binarised. For each trainer:
seconds per epoch (median of the timed epochs after one warm-up epoch), the ratio to the DataLoader loop, and
the final test -ELBO. On a CPU the trainers take turns, one epoch each (``--interleave``), so that load from
other processes falls on all of them alike; vaelib's run resumes from its checkpoint for each epoch, which on
the CPU continues bit for bit. Then the IWAE (k = 5000) negative log-likelihood of the test images, timed; on a CPU
``--iwae-images N`` evaluates N images and extrapolates the time to 10,000 (labelled as such).

    python benchmarks/train_speed.py                    # writes benchmarks/results/<device-slug>.json
    python benchmarks/train_speed.py --epochs 5 --device cuda --iwae-images 10000
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from vaelib.config import select_device
from vaelib.data import load_split
from vaelib.evaluation import evaluate_elbo, iwae_nll
from vaelib.models import build_vae
from vaelib.objectives import elbo
from vaelib.training import fit

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"CPU {model} ({torch.get_num_threads()} threads)"
    return device.type


def slug(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu-{torch.get_num_threads()}threads"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(device: torch.device):
    torch.manual_seed(0)
    return build_vae("mlp", input_dim=784, latent_dim=20, hidden=(400,), activation="relu",
                     likelihood="bernoulli").to(device)


def dataloader_epochs(train_x: Tensor, device, batch_size: int, dynamic: bool):
    """The typical tutorial: TensorDataset + DataLoader(shuffle=True), batches moved to the device.

    A generator: each ``next`` trains one epoch and yields (model, seconds, None). Its random numbers come from its own
    saved RNG state, so running other trainers between its epochs does not change its trajectory."""
    model = new_model(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(train_x), batch_size=batch_size, shuffle=True,
                        pin_memory=device.type == "cuda")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if devices else None)
    while True:
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(rng[0])
            if devices:
                torch.cuda.set_rng_state(rng[1], device)
            sync(device)
            t0 = time.perf_counter()
            for (xb,) in loader:
                xb = xb.to(device, non_blocking=True)
                if dynamic:
                    xb = torch.bernoulli(xb)
                loss = elbo(model, xb).loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sync(device)
            seconds = time.perf_counter() - t0
            rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if devices else None)
        yield model, seconds, None


def vaelib_epochs(train_x, device, batch_size: int, dynamic: bool, fast: str, run_dir: Path):
    """vaelib's fit, one epoch per ``next``: each call resumes the run in ``run_dir`` (exactly, on the CPU) and
    yields (model, the epoch's seconds as fit measured them, the path fit took)."""
    model = new_model(device)
    epoch = 0
    while True:
        epoch += 1
        result = fit(model, train_x, epochs=epoch, batch_size=batch_size, lr=1e-3, binarize=dynamic,
                     device=device, fast=fast, progress=False, seed=0, out_dir=run_dir, resume=epoch > 1)
        yield result.model, result.seconds_per_epoch[-1], result.fast


def vaelib_fit(train_x, device, epochs: int, batch_size: int, dynamic: bool, fast: str):
    model = new_model(device)
    result = fit(model, train_x, epochs=epochs, batch_size=batch_size, lr=1e-3, binarize=dynamic,
                 device=device, fast=fast, progress=False, seed=0)
    return result.model, result.seconds_per_epoch, result.fast


def test_neg_elbo(model, test_x) -> float:
    torch.manual_seed(123)
    return -evaluate_elbo(model, test_x)["elbo"]




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch (>= 3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--binarize", choices=("dynamic", "static"), default="dynamic")
    parser.add_argument("--device", default=None, help="default: cuda > mps > cpu")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--iwae-k", type=int, default=5000)
    parser.add_argument("--iwae-images", type=int, default=None,
                        help="IWAE on this many test images, time extrapolated to 10,000 (default: all on a GPU, "
                             "100 on a CPU)")
    parser.add_argument("--fastest", default=None,
                        help="vaelib's fastest path to time (default: graph-compile on CUDA, eager elsewhere)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); on a busy shared CPU, 1 avoids "
                             "threads spinning while waiting for each other")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="alternate the trainers epoch by epoch (default: on a CPU, where other processes share "
                             "the cores; on a GPU each trainer runs its epochs in one go)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<device-slug>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 3:
        parser.error("--epochs must be >= 3 (the median of at least 3 timed epochs)")

    device = select_device(args.device)
    dynamic = args.binarize == "dynamic"
    train = load_split("fashion-mnist", "train", args.data_root).images
    test = load_split("fashion-mnist", "test", args.data_root, binarize="dynamic", seed=0).images
    if not dynamic:
        train = (train > 0.5).float()  # static: one fixed binarisation
        test = (load_split("fashion-mnist", "test", args.data_root).images > 0.5).float()
    total = args.epochs + 1
    fastest = args.fastest or ("graph-compile" if device.type == "cuda" else "eager")
    print(f"device: {device_name(device)}; torch {torch.__version__}; {total} epochs each (first = warm-up)",
          flush=True)

    rows, models = {}, {}

    def record(name, model, seconds, path=None):
        models[name] = model
        timed = seconds[1:]
        rows[name] = {"path": path, "seconds_per_epoch": statistics.median(timed),
                      "epoch_seconds": [round(s, 4) for s in seconds], "test_neg_elbo": test_neg_elbo(model, test)}
        print(f"  {name:<22} {rows[name]['seconds_per_epoch']:8.3f} s/epoch   test -ELBO "
              f"{rows[name]['test_neg_elbo']:.2f}", flush=True)

    default_path = "graph" if device.type == "cuda" else "eager"  # what fit(fast="auto") takes (see fit)
    interleave = device.type == "cpu" if args.interleave is None else args.interleave
    if interleave:
        # One epoch of each trainer in turn (order reversed every other round), so that load from other
        # processes on a shared machine falls on all of them alike instead of on whichever ran at the time.
        with tempfile.TemporaryDirectory() as tmp:
            trainers = {"dataloader_loop": dataloader_epochs(train, device, args.batch_size, dynamic),
                        "vaelib_default": vaelib_epochs(train, device, args.batch_size, dynamic, "auto",
                                                        Path(tmp) / "default")}
            if fastest != default_path:
                trainers["vaelib_fastest"] = vaelib_epochs(train, device, args.batch_size, dynamic, fastest,
                                                           Path(tmp) / "fastest")
            seconds = {name: [] for name in trainers}
            last = {}
            for epoch in range(total):
                for name in (list(trainers) if epoch % 2 == 0 else list(reversed(trainers))):
                    last[name] = next(trainers[name])
                    seconds[name].append(last[name][1])
            for name in trainers:
                record(name, last[name][0], seconds[name], last[name][2])
    else:
        loop = dataloader_epochs(train, device, args.batch_size, dynamic)
        epochs = [next(loop) for _ in range(total)]
        record("dataloader_loop", epochs[-1][0], [s for _, s, _ in epochs])
        record("vaelib_default", *vaelib_fit(train, device, total, args.batch_size, dynamic, "auto"))
        if fastest != default_path:
            record("vaelib_fastest", *vaelib_fit(train, device, total, args.batch_size, dynamic, fastest))
    default_model = models["vaelib_default"]
    if "vaelib_fastest" not in rows:
        rows["vaelib_fastest"] = dict(rows["vaelib_default"], note="the default path is the fastest here")
    base = rows["dataloader_loop"]["seconds_per_epoch"]
    loop_epochs = rows["dataloader_loop"]["epoch_seconds"][1:]
    for row in rows.values():
        row["ratio_to_dataloader"] = row["seconds_per_epoch"] / base
        if interleave:
            # Epochs run back to back in the same round share the machine's state: their ratio is the fairer
            # comparison when the machine's speed drifts during the run.
            paired = [a / b for a, b in zip(row["epoch_seconds"][1:], loop_epochs, strict=True)]
            row["paired_ratio_median"] = statistics.median(paired)
            row["rounds_faster_than_dataloader"] = sum(r < 1 for r in paired)

    n_iwae = args.iwae_images or (len(test) if device.type == "cuda" else 100)
    n_iwae = min(n_iwae, len(test))
    torch.manual_seed(0)
    iwae_nll(default_model, test[:8], k=64)  # warm-up (allocator, kernels)
    sync(device)
    t0 = time.perf_counter()
    nll = iwae_nll(default_model, test[:n_iwae], k=args.iwae_k)
    sync(device)
    secs = time.perf_counter() - t0
    iwae = {"k": args.iwae_k, "images": n_iwae, "seconds": secs, "nll": nll,
            "seconds_for_10000_images": secs * len(test) / n_iwae,
            "extrapolated": n_iwae < len(test)}
    label = (f"extrapolated from {n_iwae} images" if iwae["extrapolated"] else "measured")
    print(f"  IWAE k={args.iwae_k}: {secs:.2f} s for {n_iwae} images -> "
          f"{iwae['seconds_for_10000_images']:.1f} s for 10,000 ({label}); NLL {nll:.2f} nats", flush=True)

    print("\n| trainer | path | s/epoch | ratio to DataLoader | test -ELBO |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['path'] or 'DataLoader'} | {row['seconds_per_epoch']:.3f} | "
              f"{row['ratio_to_dataloader']:.2f} | {row['test_neg_elbo']:.2f} |")
    if interleave:
        for name, row in rows.items():
            if name != "dataloader_loop":
                print(f"{name}: median per-round ratio to the DataLoader loop {row['paired_ratio_median']:.2f}; "
                      f"faster in {row['rounds_faster_than_dataloader']} of {args.epochs} rounds")

    result = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "python": sys.version.split()[0], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"dataset": "fashion-mnist", "model": "784-400-20 MLP, ReLU, Bernoulli decoder",
                     "batch_size": args.batch_size, "optimizer": "Adam(lr=1e-3)", "loss": "BCE + analytic KL",
                     "binarize": args.binarize, "epochs_timed": args.epochs, "warmup_epochs": 1,
                     "statistic": "median seconds per timed epoch", "threads": torch.get_num_threads(),
                     "interleaved": interleave},
        "trainers": rows, "iwae": iwae,
    }
    out = Path(args.out) if args.out else RESULTS / f"{slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
