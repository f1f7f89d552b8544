"""Training speed: a tutorial-style DataLoader loop against vaelib's trainers, same data, model, loss and optimizer.

Setting (one process, one device): Fashion-MNIST, 784-400-20 MLP (ReLU; Bernoulli decoder, sigmoid mean), batch
128, Adam 1e-3 (torch's default Adam in the DataLoader loop, fused on CUDA; fit's fused Adam), BCE + analytic KL,
dynamically (default) or statically binarised. One precision for every trainer: TF32 off (float32; ``--tf32``
turns it on for all). Each effect is a trainer of its own, so that it is visible on its own:

  dataloader_loop        TensorDataset + DataLoader (pinned memory on CUDA), batches copied to the device
  dataloader_loop_flushed  the same loop with subnormal floats flushed to zero, as fit does on the CPU
                         (vaelib.config.flush_denormals): how much of fit's lead that alone gives (CPU only)
  vaelib_eager           fit(fast="eager"): data resident on the device, one host sync per epoch
  vaelib_graph           fit(fast="graph"): each step one CUDA-graph replay (CUDA only)
  vaelib_graph_compile   fit(fast="graph-compile"): the same with the loss through torch.compile (CUDA only)
  matmul_ceiling         the matrix products of an epoch alone (forward, weight and input gradients of every
                         linear layer, none for the first layer's input), on preallocated tensors: the time no
                         trainer can beat at this batch size and thread count
  adam_step              fit's fused Adam step alone, as many per epoch as the trainers take: with the ceiling,
                         the floor of any trainer that updates with Adam in float32 ("ceiling_plus_adam")

Per trainer: seconds per epoch (median of the timed epochs, after one warm-up epoch), the ratios to the ceiling and
to the DataLoader loop, the setup seconds (graph capture, compilation) and the final test -ELBO. Load from other
processes is spread over the trainers: on a CPU they take turns epoch by epoch (``--interleave``; vaelib's run
resumes from its checkpoint for each epoch, which continues bit for bit), elsewhere each trainer trains
``--repeats`` times, the order reversed every other repeat. Then the IWAE (k = 5000) negative log-likelihood of
the test images, timed in turns with its ceiling (the forward products alone); on a CPU ``--iwae-images N``
evaluates N images and extrapolates both times to 10,000 (labelled as such). Then AIS (``--ais-images``, 100
temperatures, 16 chains from q, 10 leapfrog steps with a frozen step size) in two turns with its ceiling: the
decoder's forward and input-gradient products of every leapfrog gradient.

The JSON records the git commit, torch/CUDA/driver versions, the flags and the machine's load before and after; it
is written atomically, under a name with the device, the host and the time (no two machines write the same file).

    python benchmarks/train_speed.py                    # writes benchmarks/results/<device>-<host>-<time>.json
    make benchmark BENCH_ARGS="--threads 2 --epochs 5 --out benchmarks/results/cpu-2threads.json"  # committed
    python benchmarks/train_speed.py --epochs 5 --device cuda --iwae-images 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from vaelib.ais import ais_log_likelihood
from vaelib.config import flush_denormals, select_device
from vaelib.data import dynamic_binarize, load_split
from vaelib.evaluation import evaluate_elbo, iwae_bounds, iwae_nll
from vaelib.models import build_vae
from vaelib.objectives import elbo
from vaelib.runs import atomic_write
from vaelib.training import fit

RESULTS = Path(__file__).resolve().parent / "results"
#: vaelib's trainers and the fit(fast=...) each one times; the graph ones need CUDA.
VAELIB_TRAINERS = {"vaelib_eager": "eager", "vaelib_graph": "graph", "vaelib_graph_compile": "graph-compile"}
#: What is timed like a trainer but trains nothing: the parts of a step that bound every trainer from below.
PARTS = ("matmul_ceiling", "adam_step")


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"
    return device.type


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def slug(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu-{torch.get_num_threads()}threads"
    return _slugify(device_name(device))


def result_name(device: torch.device, when: datetime) -> str:
    """<device>-<host>-<UTC time>.json: two machines (or two runs) never write the same file."""
    return f"{slug(device)}-{_slugify(platform.node()) or 'host'}-{when.strftime('%Y%m%dT%H%M%SZ')}.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(device: torch.device):
    torch.manual_seed(0)
    return build_vae("mlp", input_dim=784, latent_dim=20, hidden=(400,), activation="relu",
                     likelihood="bernoulli").to(device)


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer of ``module``, in the order they run (the first reads the
    data)."""
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def _operands(shapes, rows: int, device, dtype=torch.float32) -> list[tuple[Tensor, ...]]:
    """Preallocated operands per layer: input, weight, bias, output gradient, output, weight gradient, input
    gradient."""
    def new(*shape):
        return torch.rand(*shape, device=device, dtype=dtype)
    return [(new(rows, i), new(o, i), new(o), new(rows, o), new(rows, o), new(o, i), new(rows, i)) for i, o in shapes]


def forward_products(operands, rows: int | None = None) -> None:
    """Each layer's forward product with its bias (addmm, as nn.Linear runs it), on the first ``rows`` rows."""
    for x, w, b, _, y, _, _ in operands:
        torch.addmm(b, x[:rows], w.t(), out=y[:rows])


def step_products(operands) -> None:
    """A training step's products: per layer the forward product, the weight gradient and the input gradient (not
    for the first layer, whose input needs none: autograd skips it too)."""
    for layer, (x, w, b, g, y, dw, dx) in enumerate(operands):
        torch.addmm(b, x, w.t(), out=y)
        torch.mm(g.t(), x, out=dw)
        if layer:
            torch.mm(g, w, out=dx)


def matmul_epochs(shapes, n_train: int, batch_size: int, device):
    """The training ceiling: the matrix products of one epoch alone, on preallocated tensors, one epoch per
    ``next``: per step and linear layer, the forward product with its bias (addmm, as nn.Linear runs it), the
    weight gradient and the input gradient (not for the first layer, whose input needs none: autograd skips it
    too), at the run's batch size (the last batch partial) and thread count. Nothing else a step must do (the
    nonlinearities, the loss, Adam, the binarisation) is in it. Yields like the trainers: (None, seconds, path,
    {})."""
    sizes = [batch_size] * (n_train // batch_size) + ([n_train % batch_size] if n_train % batch_size else [])
    operands = {rows: _operands(shapes, rows, device) for rows in set(sizes)}
    step_products(operands[sizes[0]])  # warm-up (allocator, the BLAS's buffers)
    while True:
        sync(device)
        t0 = time.perf_counter()
        for rows in sizes:
            step_products(operands[rows])
        sync(device)
        yield None, time.perf_counter() - t0, "matrix products only", {}


def adam_epochs(n_train: int, batch_size: int, device):
    """fit's Adam step alone (vaelib's fused Adam on the benchmark model's parameters, with fixed gradients of a
    trained model's size), one epoch's worth of steps per ``next``; yields like the trainers."""
    from vaelib.training import _make_adam

    model = new_model(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = _make_adam(model, 1e-3, "eager")
    steps = -(-n_train // batch_size)
    opt.step()  # warm-up: the moments are allocated
    while True:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync(device)
        yield None, time.perf_counter() - t0, "fused Adam step only", {}


def iwae_ceiling_seconds(model, images: int, k: int, device, block: int = 4096) -> float:
    """The IWAE ceiling for ``images`` images: the forward products alone (addmm with bias) of the encoder's
    linear layers on the images and of the decoder's on their k latent samples each, ``block`` rows at a time, on
    preallocated tensors."""
    parts = [(linear_shapes(model.encoder), images), (linear_shapes(model.decoder), images * k)]
    operands = {id(shapes): _operands(shapes, min(block, rows), device) for shapes, rows in parts}
    sync(device)
    t0 = time.perf_counter()
    for shapes, rows in parts:
        for start in range(0, rows, block):
            forward_products(operands[id(shapes)], min(block, rows - start))
    sync(device)
    return time.perf_counter() - t0


def ais_ceiling_seconds(model, rows: int, gradients: int, device, block: int = 4096) -> float:
    """The AIS ceiling: the products of ``gradients`` evaluations of grad_z log p(x, z) on ``rows`` chains at once,
    each the decoder's forward products (addmm with bias) and its input-gradient products (down to z; AIS takes
    no parameter gradients), ``block`` rows at a time, on preallocated tensors."""
    operands = _operands(linear_shapes(model.decoder), min(block, rows), device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(gradients):
        for start in range(0, rows, block):
            n = min(block, rows - start)
            forward_products(operands, n)
            for _, w, _, g, _, _, dx in operands:
                torch.mm(g[:n], w, out=dx[:n])
    sync(device)
    return time.perf_counter() - t0


def dataloader_epochs(train_x: Tensor, device, batch_size: int, dynamic: bool, flush: bool = False):
    """The typical tutorial: TensorDataset + DataLoader(shuffle=True), batches moved to the device, with the Adam
    that fit uses (fused on CUDA); with ``flush``, subnormal floats flushed to zero during each epoch, as in fit.

    A generator: each ``next`` trains one epoch and yields (model, seconds, None, setup seconds). Its random numbers
    come from its own saved RNG state, so running other trainers between its epochs does not change its trajectory.
    """
    model = new_model(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    loader = DataLoader(TensorDataset(train_x), batch_size=batch_size, shuffle=True,
                        pin_memory=device.type == "cuda")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if devices else None)
    while True:
        with torch.random.fork_rng(devices=devices), flush_denormals(flush):
            torch.set_rng_state(rng[0])
            if devices:
                torch.cuda.set_rng_state(rng[1], device)
            sync(device)
            t0 = time.perf_counter()
            for (xb,) in loader:
                xb = xb.to(device, non_blocking=True)
                if dynamic:
                    xb = dynamic_binarize(xb)
                loss = elbo(model, xb).loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sync(device)
            seconds = time.perf_counter() - t0
            rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if devices else None)
        yield model, seconds, None, {}


def vaelib_epochs(train_x, device, batch_size: int, dynamic: bool, fast: str, run_dir: Path, tf32: bool = False):
    """vaelib's fit, one epoch per ``next``: each call resumes the run in ``run_dir`` (exactly) and yields (model,
    the epoch's seconds as fit measured them, the path fit took, its setup seconds)."""
    model = new_model(device)
    epoch = 0
    while True:
        epoch += 1
        result = fit(model, train_x, epochs=epoch, batch_size=batch_size, lr=1e-3, binarize=dynamic,
                     device=device, fast=fast, progress=False, seed=0, out_dir=run_dir, resume=epoch > 1, tf32=tf32)
        yield result.model, result.seconds_per_epoch[-1], result.fast, result.setup_seconds


def vaelib_fit(train_x, device, epochs: int, batch_size: int, dynamic: bool, fast: str, tf32: bool = False):
    """vaelib's fit in one go: (model, seconds of each epoch, the path fit took, its setup seconds)."""
    model = new_model(device)
    result = fit(model, train_x, epochs=epochs, batch_size=batch_size, lr=1e-3, binarize=dynamic,
                 device=device, fast=fast, progress=False, seed=0, tf32=tf32)
    return result.model, result.seconds_per_epoch, result.fast, result.setup_seconds


def test_neg_elbo(model, test_x) -> float:
    torch.manual_seed(123)
    return -evaluate_elbo(model, test_x)["elbo"]


def machine_facts(device: torch.device) -> dict:
    """Versions and flags that a reader needs to compare two result files."""
    root = Path(__file__).resolve().parents[1]

    def run(*cmd) -> str | None:
        try:
            return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    facts = {
        "git_commit": run("git", "rev-parse", "HEAD"),
        "git_dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
        "host": platform.node(), "python": sys.version.split()[0], "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "driver": None, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        smi = run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        facts["driver"] = smi.splitlines()[0] if smi else None
    return facts


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not on every platform
        return None


def readme_table(paths) -> str:
    """The README's performance table: one row per result file (CPU runs of this benchmark)."""
    lines = ["| threads | ceiling, s/epoch | ceiling + Adam | DataLoader loop | loop, subnormals flushed | "
             "vaelib `fit` | fit's speed-up over the loop | IWAE k=5000, 10,000 images, extrapolated | "
             "AIS, 48 images | load average |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        result = json.loads(Path(path).read_text())
        rows, iwae, ais = result["trainers"], result.get("iwae"), result.get("ais")

        def cell(name, rows=rows):
            return f"{rows[name]['seconds_per_epoch']:.2f} s ({rows[name]['ratio_to_ceiling']:.2f}x)"
        load = result["load_average"]
        lines.append(
            f"| {result['settings']['threads']} | {rows['matmul_ceiling']['seconds_per_epoch']:.2f} s | "
            f"{cell('ceiling_plus_adam')} | {cell('dataloader_loop')} | {cell('dataloader_loop_flushed')} | "
            f"{cell('vaelib_eager')} | {1 / rows['vaelib_eager']['ratio_to_dataloader']:.2f}x | "
            + (f"{iwae['seconds_for_10000_images']:.0f} s ({iwae['ratio_to_ceiling']:.2f}x) | " if iwae else "- | ")
            + (f"{ais['seconds'] / ais['turns']:.1f} s ({ais['ratio_to_ceiling']:.2f}x) | " if ais else "- | ")
            + f"{load['before'][0]:.2f}-{load['after'][0]:.2f} |")
    return "\n".join(lines)


#: The result files whose figures the README's performance section shows (tests/test_benchmark.py keeps it so).
README_RESULTS = ("cpu-2threads.json", "cpu-1thread.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch (>= 1)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--binarize", choices=("dynamic", "static"), default="dynamic")
    parser.add_argument("--device", default=None, help="default: cuda > mps > cpu")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--train-size", type=int, default=None, help="first N training images (a quick look)")
    parser.add_argument("--trainers", default=None,
                        help="comma-separated subset of dataloader_loop,dataloader_loop_flushed,"
                             + ",".join(VAELIB_TRAINERS) + " (default: all that the device supports)")
    parser.add_argument("--tf32", action="store_true", help="TF32 on for every trainer (default: off for all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="trainings per trainer, the order reversed every other repeat (default: 3 on a GPU; "
                             "not with --interleave)")
    parser.add_argument("--iwae-k", type=int, default=5000)
    parser.add_argument("--iwae-images", type=int, default=None,
                        help="IWAE on this many test images, time extrapolated to 10,000 (default: all on a GPU, "
                             "100 on a CPU; 0 skips it)")
    parser.add_argument("--ais-images", type=int, default=48,
                        help="AIS (T = 100 temperatures, 16 chains, 10 leapfrog steps, from q, frozen steps) on this "
                             "many test images, timed against its ceiling (0 skips it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); on a busy shared CPU, 1 avoids "
                             "threads spinning while waiting for each other")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="alternate the trainers epoch by epoch (default: on a CPU, where other processes share "
                             "the cores)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/<device>-<host>-<time>.json)")
    parser.add_argument("--readme-table", action="store_true",
                        help="print the README's performance table from the committed results, and exit")
    args = parser.parse_args(argv)
    if args.readme_table:
        print(readme_table(RESULTS / name for name in README_RESULTS))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")

    device = select_device(args.device)
    names = ["dataloader_loop", *(["dataloader_loop_flushed"] if device.type == "cpu" else []),
             *(n for n, f in VAELIB_TRAINERS.items() if device.type == "cuda" or f == "eager")]
    if args.trainers:
        asked = [n.strip() for n in args.trainers.split(",") if n.strip()]
        unknown = [n for n in asked if n not in names]
        if unknown:
            parser.error(f"unknown or unavailable trainers {unknown}; choose from {names}")
        names = ["dataloader_loop", *(n for n in asked if n != "dataloader_loop")]  # the ratios' baseline
    dynamic = args.binarize == "dynamic"
    train = load_split("fashion-mnist", "train", args.data_root).images[:args.train_size]
    test = load_split("fashion-mnist", "test", args.data_root, binarize="dynamic", seed=0).images
    if not dynamic:
        train = (train > 0.5).float()  # static: one fixed binarisation
        test = (load_split("fashion-mnist", "test", args.data_root).images > 0.5).float()
    total = args.epochs + 1
    interleave = device.type == "cpu" if args.interleave is None else args.interleave
    repeats = 1 if interleave else (args.repeats or (3 if device.type == "cuda" else 1))
    started = datetime.now(timezone.utc)
    load_before = load_average()
    print(f"device: {device_name(device)}; torch {torch.__version__}; TF32 {'on' if args.tf32 else 'off'} for all; "
          f"{total} epochs each (first = warm-up); {'interleaved' if interleave else f'{repeats} repeats'}",
          flush=True)

    # runs[name] = one entry per repeat: (model, seconds of each epoch, path, setup seconds); the ceiling and the
    # Adam step take their turns like a trainer.
    shapes = linear_shapes(new_model(device))
    names = [*names, *PARTS]

    def epochs_of(name: str):
        """The epoch generator of a trainer or part that is not a fit (those take a run directory)."""
        if name.startswith("dataloader_loop"):
            return dataloader_epochs(train, device, args.batch_size, dynamic, flush=name.endswith("_flushed"))
        if name == "matmul_ceiling":
            return matmul_epochs(shapes, len(train), args.batch_size, device)
        return adam_epochs(len(train), args.batch_size, device)

    runs: dict[str, list] = {name: [] for name in names}
    tf32_saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32  # the loop's; fit sets its own
    try:
        if interleave:
            # One epoch of each trainer in turn (order reversed every other round), so that load from other
            # processes on a shared machine falls on all of them alike instead of on whichever ran at the time.
            with tempfile.TemporaryDirectory() as tmp:
                gens = {name: vaelib_epochs(train, device, args.batch_size, dynamic, VAELIB_TRAINERS[name],
                                            Path(tmp) / name, tf32=args.tf32) if name in VAELIB_TRAINERS
                        else epochs_of(name) for name in names}
                seconds = {name: [] for name in names}
                last = {}
                for epoch in range(total):
                    for name in (names if epoch % 2 == 0 else names[::-1]):
                        last[name] = next(gens[name])
                        seconds[name].append(last[name][1])
                for name in names:
                    model, _, path, setup = last[name]
                    runs[name].append((model, seconds[name], path, setup))
        else:
            for r in range(repeats):
                for name in (names if r % 2 == 0 else names[::-1]):
                    if name not in VAELIB_TRAINERS:
                        loop = epochs_of(name)
                        epochs = [next(loop) for _ in range(total)]
                        runs[name].append((epochs[-1][0], [s for _, s, _, _ in epochs], epochs[-1][2], {}))
                    else:
                        runs[name].append(vaelib_fit(train, device, total, args.batch_size, dynamic,
                                                     VAELIB_TRAINERS[name], tf32=args.tf32))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_saved

    rows = {}
    for name in names:
        timed = [s for _, secs, _, _ in runs[name] for s in secs[1:]]
        model, _, path, _ = runs[name][-1]
        rows[name] = {"path": path or "DataLoader", "seconds_per_epoch": statistics.median(timed),
                      "repeat_medians": [statistics.median(secs[1:]) for _, secs, _, _ in runs[name]],
                      "epoch_seconds": [[round(s, 4) for s in secs] for _, secs, _, _ in runs[name]],
                      "setup_seconds": [setup for _, _, _, setup in runs[name]],
                      "test_neg_elbo": None if model is None else test_neg_elbo(model, test)}
        elbo_txt = "" if model is None else f"   test -ELBO {rows[name]['test_neg_elbo']:.2f}"
        print(f"  {name:<22} {rows[name]['seconds_per_epoch']:8.3f} s/epoch{elbo_txt}   setup "
              f"{rows[name]['setup_seconds'][0]}", flush=True)
    rows["matmul_ceiling"]["products"] = ("per step and linear layer: forward (addmm), weight gradient, input "
                                          "gradient (not the first layer's); " + str(shapes))
    # The floor of an Adam trainer in float32: the products and the update, with nothing else.
    floor = [[a + b for a, b in zip(*(rows[p]["epoch_seconds"][r] for p in PARTS), strict=True)]
             for r in range(len(rows["adam_step"]["epoch_seconds"]))]
    rows["ceiling_plus_adam"] = {"path": "matmul_ceiling + adam_step, epoch by epoch",
                                 "seconds_per_epoch": statistics.median(s for secs in floor for s in secs[1:]),
                                 "epoch_seconds": floor, "setup_seconds": [{}], "test_neg_elbo": None}
    for ref, key in (("dataloader_loop", "dataloader"), ("matmul_ceiling", "ceiling"),
                     ("ceiling_plus_adam", "ceiling_plus_adam")):
        base = rows[ref]["seconds_per_epoch"]
        for row in rows.values():
            row[f"ratio_to_{key}"] = row["seconds_per_epoch"] / base
            if interleave:
                # Epochs run back to back in the same round share the machine's state: their ratio is the fairer
                # comparison when the machine's speed drifts during the run.
                ref_epochs = rows[ref]["epoch_seconds"][0][1:]
                paired = [a / b for a, b in zip(row["epoch_seconds"][0][1:], ref_epochs, strict=True)]
                row[f"paired_ratio_to_{key}_median"] = statistics.median(paired)
                if key == "dataloader":
                    row["rounds_faster_than_dataloader"] = sum(r < 1 for r in paired)

    # IWAE and AIS evaluate vaelib's trained model (else the last trainer's)
    eval_model = next(runs[n][-1][0] for n in ("vaelib_eager", *reversed(names)) if n in runs and runs[n][-1][0])
    iwae = None
    n_iwae = args.iwae_images if args.iwae_images is not None else (len(test) if device.type == "cuda" else 100)
    n_iwae = min(n_iwae, len(test))
    if n_iwae > 0:
        torch.manual_seed(0)
        iwae_nll(eval_model, test[:8], k=64)  # warm-up (allocator, kernels)
        iwae_ceiling_seconds(eval_model, 8, 64, device)
        # In turns with its ceiling, a slice of the images at a time, the order reversed every other turn.
        slices = [test[i:i + n_iwae // 4 or 1] for i in range(0, n_iwae, n_iwae // 4 or 1)]
        secs = ceiling = 0.0
        bounds = []
        for turn, part in enumerate(slices):
            for what in (("iwae", "ceiling") if turn % 2 == 0 else ("ceiling", "iwae")):
                if what == "ceiling":
                    ceiling += iwae_ceiling_seconds(eval_model, len(part), args.iwae_k, device)
                    continue
                sync(device)
                t0 = time.perf_counter()
                bounds.append(iwae_bounds(eval_model, part, k=args.iwae_k))
                sync(device)
                secs += time.perf_counter() - t0
        nll = -torch.cat(bounds).mean().item()
        scale = len(test) / n_iwae
        iwae = {"k": args.iwae_k, "images": n_iwae, "seconds": secs, "nll": nll,
                "seconds_for_10000_images": secs * scale, "extrapolated": n_iwae < len(test),
                "ceiling_seconds": ceiling, "ceiling_seconds_for_10000_images": ceiling * scale,
                "ratio_to_ceiling": secs / ceiling,
                "ceiling": "forward products alone (addmm with bias): the encoder's linear layers on the images, "
                           "the decoder's on k samples per image, 4096 rows at a time"}
        label = (f"extrapolated from {n_iwae} images" if iwae["extrapolated"] else "measured")
        print(f"  IWAE k={args.iwae_k}: {secs:.2f} s for {n_iwae} images -> "
              f"{iwae['seconds_for_10000_images']:.1f} s for 10,000 ({label}); NLL {nll:.2f} nats; "
              f"{iwae['ratio_to_ceiling']:.2f}x its ceiling ({ceiling:.2f} s)", flush=True)

    ais = None
    if args.ais_images > 0:
        n_steps, chains, leapfrog = 100, 16, 10
        # The transitions' gradients: n_leapfrog per intermediate temperature, all chains of all images at once.
        gradients, chain_rows = (n_steps - 1) * leapfrog, chains * min(args.ais_images, len(test))
        ais_log_likelihood(eval_model, test[:4], n_steps=3, n_chains=4, target_acceptance=None)  # warm-up
        secs = ceiling = 0.0
        for turn in range(2):
            for what in (("ais", "ceiling") if turn % 2 == 0 else ("ceiling", "ais")):
                if what == "ceiling":
                    ceiling += ais_ceiling_seconds(eval_model, chain_rows, gradients, device)
                    continue
                sync(device)
                t0 = time.perf_counter()
                result = ais_log_likelihood(eval_model, test[:args.ais_images], n_steps=n_steps, n_chains=chains,
                                            n_leapfrog=leapfrog, step_size=0.05, target_acceptance=None,
                                            seed=turn)
                sync(device)
                secs += time.perf_counter() - t0
        scale = len(test) / min(args.ais_images, len(test)) / 2  # two turns
        ais = {"images": min(args.ais_images, len(test)), "turns": 2, "n_steps": n_steps, "n_chains": chains,
               "n_leapfrog": leapfrog, "start": "encoder", "step_size": "0.05, frozen", "seconds": secs,
               "log_px_mean_last_turn": result.log_px.mean().item(), "seconds_for_10000_images": secs * scale,
               "extrapolated": True, "ceiling_seconds": ceiling, "ratio_to_ceiling": secs / ceiling,
               "ceiling": "per gradient of log p(x, z) in z, (T - 1) x n_leapfrog of them: the decoder's forward "
                          "products (addmm) and input-gradient products on all chains at once, 4096 rows at a time"}
        print(f"  AIS T={n_steps}, {chains} chains, {leapfrog} leapfrog: {secs:.2f} s for {ais['images']} images x 2 "
              f"-> {ais['seconds_for_10000_images']:.0f} s for 10,000 (extrapolated); "
              f"{ais['ratio_to_ceiling']:.2f}x its ceiling ({ceiling:.2f} s)", flush=True)

    print("\n| trainer | path | s/epoch | ratio to the ceiling | to the ceiling plus Adam | ratio to DataLoader | "
          "setup s | test -ELBO |\n|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        setup = sum(row["setup_seconds"][0].values())
        elbo_txt = "" if row["test_neg_elbo"] is None else f"{row['test_neg_elbo']:.2f}"
        print(f"| {name} | {row['path']} | {row['seconds_per_epoch']:.3f} | {row['ratio_to_ceiling']:.2f} | "
              f"{row['ratio_to_ceiling_plus_adam']:.2f} | {row['ratio_to_dataloader']:.2f} | {setup:.1f} | "
              f"{elbo_txt} |")
    if interleave:
        for name, row in rows.items():
            if name in VAELIB_TRAINERS or name == "dataloader_loop_flushed":
                print(f"{name}: median per-round ratio to the ceiling {row['paired_ratio_to_ceiling_median']:.2f} "
                      f"(to the ceiling plus Adam {row['paired_ratio_to_ceiling_plus_adam_median']:.2f}), "
                      f"to the DataLoader loop {row['paired_ratio_to_dataloader_median']:.2f}; faster than it in "
                      f"{row['rounds_faster_than_dataloader']} of {args.epochs} rounds")

    result = {
        "device": device_name(device), "device_type": device.type, "date": started.isoformat(timespec="seconds"),
        "machine": machine_facts(device),
        "load_average": {"before": load_before, "after": load_average()},
        "settings": {"dataset": "fashion-mnist", "model": "784-400-20 MLP, ReLU, Bernoulli decoder",
                     "batch_size": args.batch_size, "train_images": len(train),
                     "optimizer": "Adam(lr=1e-3): torch's default in the DataLoader loop"
                                  + (" (fused on CUDA)" if device.type == "cuda" else "") + ", fused in fit",
                     "loss": "BCE + analytic KL", "binarize": args.binarize, "epochs_timed": args.epochs,
                     "warmup_epochs": 1, "statistic": "median seconds per timed epoch (all repeats)",
                     "tf32": args.tf32, "threads": torch.get_num_threads(), "interleaved": interleave,
                     "repeats": repeats, "order": "alternated (reversed every other round/repeat)"},
        "trainers": rows, "iwae": iwae, "ais": ais,
    }
    out = Path(args.out) if args.out else RESULTS / result_name(device, started)
    atomic_write(out, lambda fh: fh.write((json.dumps(result, indent=1) + "\n").encode()))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
