"""Several independent models: vaelib.training.fit_many (one worker process per core, one thread each) against
training them one after the other in this process, with one thread and with all of them.

Setting: Fashion-MNIST (the first ``--train-size`` images), ``--jobs`` 784-400-20 VAEs that differ in beta (a
beta sweep), batch 128, Adam 1e-3, dynamically binarised, ``--epochs`` each. The three ways take turns, the order
reversed every other round (``--rounds``), so that load from other processes falls on all of them alike; the
figure is the ratio of each way's median wall time to fit_many's.

    python benchmarks/fit_many_speed.py                  # prints the table; --out FILE also writes JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import cpu_model  # noqa: E402

from vaelib.data import load_split
from vaelib.training import fit_many


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    train = load_split("fashion-mnist", "train").images[:args.train_size]
    jobs = [{"model": {"latent_dim": 20, "hidden": [400]}, "beta": 0.5 + i} for i in range(args.jobs)]
    common = {"epochs": args.epochs, "batch_size": 128, "lr": 1e-3, "binarize": True}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()

    def one_after_another(n_threads: int):
        torch.set_num_threads(n_threads)
        try:
            return _one_after_another(jobs, train, common)
        finally:
            torch.set_num_threads(threads)

    ways = {"fit_many": lambda: fit_many(jobs, train, **common),
            "one after another, 1 thread": lambda: one_after_another(1),
            f"one after another, {threads} threads": lambda: one_after_another(threads)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            t0 = time.perf_counter()
            ways[name]()
            seconds[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: {name}: {seconds[name][-1]:.1f} s", flush=True)
    base = statistics.median(seconds["fit_many"])
    rows = {name: {"seconds": statistics.median(s), "all_seconds": s, "ratio_to_fit_many": statistics.median(s) / base}
            for name, s in seconds.items()}
    print(f"\n{args.jobs} jobs x {args.epochs} epochs x {len(train)} images on {cores} cores "
          f"(load {load_before} -> {os.getloadavg()}):")
    for name, row in rows.items():
        print(f"  {name:<32} {row['seconds']:7.1f} s   {row['ratio_to_fit_many']:.2f}x fit_many's time")
    if args.out:
        result = {"cpu": cpu_model(), "torch": torch.__version__, "jobs": args.jobs, "epochs": args.epochs,
                  "train_images": len(train), "cores": cores, "load_before": load_before,
                  "load_after": os.getloadavg(), "ways": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _one_after_another(jobs, train, common):
    """The jobs in turn in this process, a plain loop over fit (seeded as fit_many seeds them)."""
    from vaelib.models import build_vae
    from vaelib.training import fit

    results = []
    for job in jobs:
        torch.manual_seed(0)
        model = build_vae(**job["model"])
        settings = {**common, **{k: v for k, v in job.items() if k != "model"}}
        results.append(fit(model, train, device="cpu", progress=False, **settings))
    return results


if __name__ == "__main__":
    sys.exit(main())
