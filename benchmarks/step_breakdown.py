"""Where a training step's time goes: fit's 784-400-20 step taken apart, each part timed alone in turns.

The ceiling of ``train_speed.py`` counts the matrix products only. This script times, per step of 128 images, at
the run's thread count and with subnormals flushed (as fit trains):

  full_step            gather a batch, forward, backward, fused Adam (fit's step without its tally)
  without_adam         the same without the optimizer step
  forward_only         the ELBO's forward alone, without autograd
  products             the ceiling: forward, weight- and input-gradient products on preallocated tensors
  linears_autograd     the same four linear layers through nn.Linear and autograd, forward and backward, the
                       gradients reset as zero_grad does: what the products cost inside a real step
  adam_step            fit's fused Adam step alone
  binarisation         one epoch's dynamic binarisation into a reused buffer, per step (one generator, as fit)
  likelihood           the Bernoulli log-likelihood (BCE with logits) of a batch, forward and backward

and the Bernoulli log-likelihood of one IWAE chunk (2^20 decoder outputs) against the decoder's forward
products on it. Each part runs ``--rounds`` times, the order reversed every other round; the median is kept.

    python benchmarks/step_breakdown.py --threads 2 --out benchmarks/results/step-breakdown-cpu-2threads.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (the benchmark's model, operands and machine facts)

from vaelib.config import flush_denormals  # noqa: E402
from vaelib.data import dynamic_binarize, load_split  # noqa: E402
from vaelib.objectives import elbo  # noqa: E402
from vaelib.runs import atomic_write  # noqa: E402
from vaelib.training import _make_adam  # noqa: E402


def step_parts(train: torch.Tensor, steps: int, batch_size: int = 128) -> dict:
    """The parts of a step as functions that each run ``steps`` steps."""
    dev = torch.device("cpu")
    data = dynamic_binarize(train, torch.Generator().manual_seed(0))
    model = train_speed.new_model(dev)
    opt = _make_adam(model, 1e-3, "eager")
    buffer = torch.empty(batch_size, train.shape[1])
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:steps * batch_size]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    operands = train_speed._operands(train_speed.linear_shapes(model), batch_size, dev)
    inputs = [torch.rand(batch_size, lin.in_features, requires_grad=i > 0) for i, lin in enumerate(linears)]
    binarised = torch.empty_like(train)
    logits = torch.randn(batch_size, train.shape[1], requires_grad=True)

    def batches():
        for idx in perm.split(batch_size):
            yield torch.index_select(data, 0, idx, out=buffer[:len(idx)])

    def full_step():
        for xb in batches():
            opt.zero_grad()
            elbo(model, xb).loss().backward()
            opt.step()

    def without_adam():
        for xb in batches():
            opt.zero_grad()
            elbo(model, xb).loss().backward()

    @torch.no_grad()
    def forward_only():
        for xb in batches():
            elbo(model, xb).loss()

    def products():
        for _ in range(steps):
            train_speed.step_products(operands)

    def linears_autograd():
        for _ in range(steps):
            for lin, x in zip(linears, inputs, strict=True):
                lin.weight.grad = lin.bias.grad = x.grad = None
                y = lin(x)
                y.backward(torch.ones_like(y))

    def adam_step():
        for _ in range(steps):
            opt.step()

    generator = torch.Generator().manual_seed(2)

    def binarisation():  # one epoch's draws, counted per step of that epoch
        dynamic_binarize(train, generator, out=binarised)

    def likelihood():
        xb = data[:batch_size]
        for _ in range(steps):
            logits.grad = None
            F.binary_cross_entropy_with_logits(logits, xb, reduction="none").sum(-1).mean().backward()

    per_step = {"binarisation": -(-len(train) // batch_size)}
    return {f.__name__: (f, per_step.get(f.__name__, steps)) for f in (
        full_step, without_adam, forward_only, products, linears_autograd, adam_step, binarisation, likelihood)}


def iwae_chunk(train: torch.Tensor, rounds: int) -> dict:
    """One IWAE chunk (2^20 decoder outputs): the decoder's forward products alone, and the same followed by the
    Bernoulli log-likelihood of their output (as IWAE runs them: the logits still in cache); the difference is the
    likelihood's cost."""
    model = train_speed.new_model(torch.device("cpu"))
    rows = 2**20 // train.shape[1]
    operands = train_speed._operands(train_speed.linear_shapes(model.decoder), rows, torch.device("cpu"))
    x = dynamic_binarize(train[:rows], torch.Generator().manual_seed(3))

    def products():
        train_speed.forward_products(operands)

    def with_likelihood():
        products()
        F.binary_cross_entropy_with_logits(operands[-1][4], x, reduction="none").sum(-1)

    seconds = {"products": [], "products_and_likelihood": []}
    with torch.inference_mode():
        with_likelihood()  # warm-up
        for r in range(rounds):
            for name, f in (("products", products), ("products_and_likelihood", with_likelihood))[::1 - 2 * (r % 2)]:
                t0 = time.perf_counter()
                for _ in range(10):
                    f()
                seconds[name].append((time.perf_counter() - t0) / 10)
    ms = {name: statistics.median(s) * 1e3 for name, s in seconds.items()}
    likelihood = ms["products_and_likelihood"] - ms["products"]
    return {"rows": rows, "ms": ms, "likelihood_ms": likelihood,
            "likelihood_over_products": likelihood / ms["products"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=469, help="steps per timing (469: one epoch of 60,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_split("fashion-mnist", "train").images
    load_before = train_speed.load_average()
    with flush_denormals():
        parts = step_parts(train, args.steps)
        for f, _ in parts.values():  # warm-up: allocator, kernels, Adam's moments
            f()
        seconds: dict[str, list[float]] = {name: [] for name in parts}
        for r in range(args.rounds):
            for name in (list(parts) if r % 2 == 0 else list(parts)[::-1]):
                f, steps = parts[name]
                t0 = time.perf_counter()
                f()
                seconds[name].append((time.perf_counter() - t0) / steps * 1e3)
        chunk = iwae_chunk(train, args.rounds)
    ms = {name: statistics.median(s) for name, s in seconds.items()}
    ceiling = ms["products"]
    derived = {
        "adam (full_step - without_adam)": ms["full_step"] - ms["without_adam"],
        "autograd's cost on the products (linears_autograd - products)": ms["linears_autograd"] - ceiling,
        "the rest of forward and backward (without_adam - linears_autograd - likelihood)":
            ms["without_adam"] - ms["linears_autograd"] - ms["likelihood"],
        "floor of this work: products + adam_step + binarisation + likelihood":
            ceiling + ms["adam_step"] + ms["binarisation"] + ms["likelihood"],
    }
    print("| part | ms per step | x the products |\n|---|---|---|")
    for name, value in {**ms, **derived}.items():
        print(f"| {name} | {value:.3f} | {value / ceiling:.2f} |")
    print(f"IWAE chunk of {chunk['rows']} samples: decoder products {chunk['ms']['products']:.3f} ms, then the "
          f"Bernoulli log-likelihood {chunk['likelihood_ms']:.3f} ms more ({chunk['likelihood_over_products']:.2f}x)")
    result = {"machine": train_speed.machine_facts(torch.device("cpu")),
              "load_average": {"before": load_before, "after": train_speed.load_average()},
              "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds,
              "ms_per_step": ms, "derived_ms_per_step": derived,
              "ratios_to_products": {k: v / ceiling for k, v in {**ms, **derived}.items()}, "iwae_chunk": chunk}
    if args.out:
        atomic_write(Path(args.out), lambda fh: fh.write((json.dumps(result, indent=1) + "\n").encode()))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
