"""Command line: ``python -m vaelib {train,eval,data} ...`` (see ``python -m vaelib <command> --help``).

Exit codes: 0 success, 2 bad arguments or a domain error (missing data or run directory, divergence; one line on
stderr, no traceback), 130 interrupted (Ctrl-C) after saving a resumable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and still exit code 2)."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 400 or 200,200, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    from vaelib.models import ACTIVATIONS, ARCHS, LIKELIHOODS
    from vaelib.training import FAST_MODES

    parser = _OneLineParser(prog="python -m vaelib", description="Train, evaluate and locate data for VAEs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser, metavar="COMMAND")

    tr = sub.add_parser("train", help="train a VAE on MNIST or Fashion-MNIST",
                        description="Train a VAE; writes checkpoint.pt, history.json/.csv and run.json to --out.")
    tr.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist or mnist (default: %(default)s)")
    tr.add_argument("--data-root", metavar="DIR", help="folder with the IDX files (default: vaelib's search path)")
    tr.add_argument("--out", required=True, metavar="DIR", help="run directory (created if missing)")
    tr.add_argument("--arch", choices=ARCHS, default="mlp", help="network family (default: %(default)s)")
    tr.add_argument("--latent", type=_positive_int, default=None,
                    help="latent dimension (default: 20; 50 for burda)")
    tr.add_argument("--hidden", type=_widths, default=None, metavar="W[,W...]",
                    help="hidden widths, e.g. 400 or 200,200 (default: 400; 200,200 for burda)")
    tr.add_argument("--activation", choices=sorted(ACTIVATIONS), default=None,
                    help="hidden activation (default: relu; tanh for burda)")
    tr.add_argument("--likelihood", choices=LIKELIHOODS, default=None,
                    help="p(x|z) (default: bernoulli; gaussian-learned for linear)")
    tr.add_argument("--sigma", type=_positive_float, default=1.0,
                    help="Gaussian sigma (fixed) or its initial value (learned) (default: %(default)s)")
    tr.add_argument("--binarize", choices=("none", "dynamic", "threshold"), default="none",
                    help="none: grey levels; dynamic: a new Bernoulli draw every epoch (Burda et al. 2015); "
                         "threshold: pixels > 0.5 (default: %(default)s)")
    tr.add_argument("--epochs", type=_nonnegative_int, default=10, help="total epochs (default: %(default)s)")
    tr.add_argument("--batch-size", type=_positive_int, default=128, help="(default: %(default)s)")
    tr.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    tr.add_argument("--lr-final", type=_positive_float, default=None,
                    help="decay the learning rate geometrically to this value in the last epoch (default: constant)")
    tr.add_argument("--beta", type=float, default=1.0, help="KL weight (default: %(default)s)")
    tr.add_argument("--warmup-epochs", type=_nonnegative_int, default=0,
                    help="linear KL warm-up from 0 to beta over this many epochs (default: %(default)s)")
    tr.add_argument("--kl", choices=("analytic", "mc"), default="analytic",
                    help="KL estimator (default: %(default)s)")
    tr.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda > mps > cpu)")
    tr.add_argument("--fast", choices=FAST_MODES, default="auto",
                    help="training path: auto = CUDA graph on CUDA, eager elsewhere (default: %(default)s)")
    tr.add_argument("--checkpoint-every", type=_positive_int, default=1, metavar="N",
                    help="write the checkpoint every N epochs (and at the end, and on Ctrl-C) (default: 1)")
    tr.add_argument("--train-size", type=_positive_int, default=None, metavar="N",
                    help="use only the first N training images (quick runs)")
    tr.add_argument("--test-size", type=_nonnegative_int, default=None, metavar="N",
                    help="evaluate on the first N test images each epoch (0: none; default: all)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="evaluate a trained run on the test set",
                        description="Test ELBO, IWAE negative log-likelihood, active units and KL per dimension; "
                                    "writes eval.json to the run directory.")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `train`")
    ev.add_argument("--iwae-k", type=_nonnegative_int, default=5000,
                    help="importance samples for the IWAE bound (0: skip it) (default: %(default)s)")
    ev.add_argument("--iwae-images", type=_positive_int, default=None, metavar="N",
                    help="IWAE on the first N test images only (default: all)")
    ev.add_argument("--test-size", type=_positive_int, default=None, metavar="N",
                    help="use only the first N test images for everything")
    ev.add_argument("--data-root", metavar="DIR", help="folder with the IDX files (default: as in training)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda > mps > cpu)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo estimates (default: %(default)s)")
    ev.add_argument("--max-elements", type=_positive_int, default=None, metavar="N",
                    help="memory bound: decoder outputs per IWAE chunk (default: 2^27 on CUDA, 2^24 on CPU)")

    da = sub.add_parser("data", help="locate and verify (or download) a data set and print its folder",
                        description="Locate the four IDX files, verify their checksums and print the folder.")
    da.add_argument("name", metavar="NAME", help="fashion-mnist or mnist")
    da.add_argument("--root", metavar="DIR", help="look here first (and download here with --download)")
    da.add_argument("--download", action="store_true", help="download through torchvision if missing")
    return parser


def _device(text: str | None):
    """The --device, checked now (a missing one is a DeviceUnavailableError, a ValueError: one line, exit 2)."""
    from vaelib.config import select_device

    return None if text is None else select_device(text)


def _load_images(dataset: str, split: str, root, binarize: str, seed: int, size: int | None):
    from vaelib.data import load_split

    # Training data for dynamic binarisation stay grey (fit redraws them every epoch); the test set is drawn once.
    mode = {"none": None, "threshold": "threshold", "dynamic": "dynamic" if split == "test" else None}[binarize]
    data = load_split(dataset, split, root, binarize=mode, seed=seed)
    images, labels = data.images, data.labels
    if size is not None:
        images, labels = images[:size], labels[:size]
    return images, labels


def cmd_train(args) -> int:
    import torch

    from vaelib.models import build_vae
    from vaelib.training import TrainingInterrupted, fit

    device = _device(args.device)
    train_x, _ = _load_images(args.dataset, "train", args.data_root, args.binarize, args.seed, args.train_size)
    test_x = None
    if args.test_size != 0:
        test_x, _ = _load_images(args.dataset, "test", args.data_root, args.binarize, args.seed, args.test_size)
    torch.manual_seed(args.seed)  # the initial weights
    model = build_vae(args.arch, input_dim=train_x.shape[1], latent_dim=args.latent, hidden=args.hidden,
                      activation=args.activation, likelihood=args.likelihood, sigma=args.sigma)
    run_info = {"dataset": args.dataset, "data_root": args.data_root, "binarize": args.binarize,
                "train_size": args.train_size, "test_size": args.test_size, "seed": args.seed,
                "command": "python -m vaelib " + shlex.join(args.argv)}
    try:
        result = fit(model, train_x, test_x, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     lr_final=args.lr_final, beta=args.beta, warmup_epochs=args.warmup_epochs,
                     binarize=args.binarize == "dynamic",
                     device=device, seed=args.seed, out_dir=args.out, resume=args.resume, fast=args.fast,
                     progress=not args.no_progress, checkpoint_every=args.checkpoint_every, kl=args.kl,
                     run_info=run_info)
    except TrainingInterrupted as stop:
        argv = [a for a in args.argv if a != "--resume"] + ["--resume"]
        where = (f"a resumable checkpoint (epoch {stop.epoch}) is in {stop.checkpoint}"
                 if stop.checkpoint is not None else "nothing was saved")
        print(f"vaelib: interrupted; {where}. Resume with: python -m vaelib {shlex.join(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k}={last[k]:.3f}" for k in ("train_loss", "test_elbo") if k in last)
    secs = sum(result.seconds_per_epoch)
    print(f"trained {len(result.history)} epochs on {result.device} ({result.fast}; {secs:.1f} s this session)"
          f"{': ' + summary if summary else ''}; run saved in {args.out}")
    return EXIT_OK


def cmd_eval(args) -> int:
    import torch

    from vaelib.evaluation import active_units, evaluate_elbo, iwae_nll, kl_per_dimension
    from vaelib.training import atomic_write, load_run

    run = load_run(args.run_dir, device=_device(args.device))
    info = run.run.get("run_info", {})
    if "dataset" not in info:
        raise ValueError(f"{args.run_dir}: run.json does not say which data set was used (not a CLI run?)")
    root = args.data_root or info.get("data_root")
    test_x, _ = _load_images(info["dataset"], "test", root, info.get("binarize", "none"), info.get("seed", 0),
                             args.test_size)
    model = run.model
    torch.manual_seed(args.seed)
    results: dict = {"run_dir": str(args.run_dir), "epoch": run.epoch, "test_images": len(test_x)}
    results.update({f"test_{k}": v for k, v in evaluate_elbo(model, test_x).items()})
    count, variances = active_units(model, test_x)
    results["active_units"] = count
    results["latent_dim"] = model.latent_dim
    results["au_variances"] = [round(v, 6) for v in variances.tolist()]
    results["kl_per_dimension"] = [round(v, 6) for v in kl_per_dimension(model, test_x).tolist()]
    if args.iwae_k > 0:
        n = min(len(test_x), args.iwae_images or len(test_x))
        results["iwae_k"], results["iwae_images"] = args.iwae_k, n
        results["iwae_nll"] = iwae_nll(model, test_x[:n], k=args.iwae_k, max_elements=args.max_elements)
    print(f"run {args.run_dir} (epoch {run.epoch}), {len(test_x)} test images")
    print(f"  test ELBO        {results['test_elbo']:.3f} nats (rec {results['test_rec']:.3f}, "
          f"KL {results['test_kl']:.3f})")
    if "iwae_nll" in results:
        print(f"  IWAE NLL (k={args.iwae_k}, {results['iwae_images']} images)  {results['iwae_nll']:.3f} nats")
    print(f"  active units     {count} of {model.latent_dim} (Var_x E_q[z_j] > 0.01)")
    out = Path(args.run_dir) / "eval.json"
    atomic_write(out, lambda fh: fh.write(json.dumps(results, indent=1).encode()))  # never a torn eval.json
    print(f"  written to {out}")
    return EXIT_OK


def cmd_data(args) -> int:
    from vaelib.data import DataNotFoundError, download_dataset, find_dataset, load_split

    try:
        folder = find_dataset(args.name, args.root)
    except DataNotFoundError:
        if not args.download:
            raise
        folder = download_dataset(args.name, args.root)
    for split in ("train", "test"):  # reads every file and checks its MD5
        load_split(args.name, split, folder, dtype="uint8")
    print(folder)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    from vaelib.data import DataError
    from vaelib.training import RunNotFoundError, TrainingDivergedError

    command = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data}[args.command]
    try:
        return command(args)
    except (DataError, RunNotFoundError, TrainingDivergedError, FileNotFoundError, ValueError, TypeError) as err:
        message = " ".join(str(err).split())  # one line, whatever the exception put in it
        print(f"vaelib {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
