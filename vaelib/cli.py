"""Command line: ``python -m vaelib {train,eval,data} ...`` (see ``python -m vaelib <command> --help``).

Exit codes: 0 success; 2 bad arguments or a fault vaelib can name (a :class:`~vaelib.errors.VaelibError`: missing
or corrupt data, a missing run, divergence; or an OS error: permission denied, not a directory, no space left),
always one line on stderr — ``--debug`` adds the traceback; out of memory is such a fault too, named with the option
that made the work large; 130 interrupted by Ctrl-C, 143 by SIGTERM and 129 by SIGHUP (a dropped SSH session;
handled alike), after saving a resumable checkpoint when training.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from vaelib.errors import VaelibError, is_out_of_memory

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130
_MAX_SEED = 2**63 - 2  # torch generators take 64-bit seeds; fit also seeds a generator with seed + 1


class CommandLineError(VaelibError, ValueError):
    """An option's value that the parser could not judge alone (e.g. --out names a file)."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and still exit code 2)."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Argument types. Their messages follow argparse's "argument --seed: ", so they say what was expected in the
# user's words; a ValueError would make argparse name the function instead ("invalid _nonnegative_int value").
def _integer(text: str, low: int, what: str, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _nonnegative_int(text: str) -> int:
    return _integer(text, 0, "a non-negative integer")


def _seed(text: str) -> int:
    return _integer(text, 0, "a non-negative integer below 2**63 - 1", _MAX_SEED)


def _number(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):  # nan and inf parse as floats but are no step size or weight
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _number(text, "a finite positive number", lambda v: v > 0)


def _nonnegative_float(text: str) -> float:
    return _number(text, "a finite number >= 0", lambda v: v >= 0)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 400 or 200,200, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"expected positive widths, got {text!r}")
    return widths


# The train options that define a run: resuming with another value is refused. On --resume, these and
# CHANGEABLE_ON_RESUME take the run's values unless given.
RUN_OPTIONS = ("dataset", "binarize", "train_size", "test_size", "seed", "batch_size", "lr", "lr_final", "beta",
               "warmup_epochs", "kl", "arch", "latent", "hidden", "activation", "likelihood", "sigma", "posterior",
               "prior", "pseudo_inputs", "objective", "k")
CHANGEABLE_ON_RESUME = ("epochs", "checkpoint_every", "data_root", "fast")  # and --device, --no-progress


def _given(argv: list[str]) -> dict:
    """The options ``argv`` names explicitly (dest -> value), defaults left out."""
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices["train"]._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    from vaelib.models import ACTIVATIONS, ARCHS, LIKELIHOODS, POSTERIORS, PRIORS
    from vaelib.objectives import CPU_MAX_ELEMENTS, CUDA_MAX_ELEMENTS, OBJECTIVES
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
    tr.add_argument("--beta", type=_nonnegative_float, default=1.0, help="KL weight (default: %(default)s)")
    tr.add_argument("--warmup-epochs", type=_nonnegative_int, default=0,
                    help="linear KL warm-up from 0 to beta over this many epochs (default: %(default)s)")
    tr.add_argument("--kl", choices=("analytic", "mc"), default=None,
                    help="KL estimator (default: analytic; mc for --prior vamp, which has no closed form)")
    tr.add_argument("--posterior", choices=POSTERIORS, default="diagonal",
                    help="q(z|x): diagonal Gaussian, or full = full covariance through a Cholesky factor "
                         "(mlp, burda and linear archs) (default: %(default)s)")
    tr.add_argument("--prior", choices=PRIORS, default="standard",
                    help="p(z): standard = N(0, I); vamp = VampPrior, a mixture of the encoder's posteriors at "
                         "learned pseudo-inputs (Tomczak & Welling 2018) (default: %(default)s)")
    tr.add_argument("--pseudo-inputs", type=_positive_int, default=None, metavar="C",
                    help="number of VampPrior pseudo-inputs (only with --prior vamp; default: 500)")
    tr.add_argument("--objective", choices=OBJECTIVES, default="elbo",
                    help="training objective: elbo, or iwae = the k-sample importance-weighted bound "
                         "(Burda et al. 2015) (default: %(default)s)")
    tr.add_argument("--k", type=_positive_int, default=None, metavar="K",
                    help="importance samples per example for --objective iwae (required with it)")
    tr.add_argument("--seed", type=_seed, default=0, help="(default: %(default)s)")
    tr.add_argument("--device", default=None,
                    help="cpu, cuda, cuda:N or mps (default: $VAELIB_DEVICE, else cuda > mps > cpu)")
    tr.add_argument("--fast", choices=FAST_MODES, default="auto",
                    help="training path: auto = CUDA graph on CUDA, eager elsewhere (default: %(default)s)")
    tr.add_argument("--checkpoint-every", type=_positive_int, default=1, metavar="N",
                    help="write the checkpoint every N epochs (and at the end, and on Ctrl-C) (default: 1)")
    tr.add_argument("--train-size", type=_positive_int, default=None, metavar="N",
                    help="use only the first N training images (quick runs)")
    tr.add_argument("--test-size", type=_nonnegative_int, default=None, metavar="N",
                    help="evaluate on the first N test images each epoch (0: none; default: all)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its checkpoint; options not given are the run's, and only "
                         + ", ".join(map(_option, CHANGEABLE_ON_RESUME)) + " and --device may differ from them, "
                         "except that --lr may be lowered (not raised): after a divergence, which keeps the last good "
                         "epoch, resume with a smaller --lr (history.json records each epoch's lr)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the run in --out (its files go once the new run's first checkpoint is written)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="evaluate a trained run on the test set",
                        description="Test ELBO, IWAE negative log-likelihood (and, with --ais, an annealed importance "
                                    "sampling estimate), active units and KL per dimension; writes eval.json to "
                                    "the run directory.")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `train`")
    ev.add_argument("--iwae-k", type=_nonnegative_int, default=5000,
                    help="importance samples for the IWAE bound (0: skip it) (default: %(default)s)")
    ev.add_argument("--iwae-images", type=_positive_int, default=None, metavar="N",
                    help="IWAE on the first N test images only (default: all)")
    ev.add_argument("--test-size", type=_positive_int, default=None, metavar="N",
                    help="use only the first N test images for everything")
    ev.add_argument("--data-root", metavar="DIR", help="folder with the IDX files (default: as in training)")
    ev.add_argument("--device", default=None,
                    help="cpu, cuda, cuda:N or mps (default: $VAELIB_DEVICE, else cuda > mps > cpu)")
    ev.add_argument("--seed", type=_seed, default=0, help="seed of the Monte-Carlo estimates (default: %(default)s)")
    ev.add_argument("--max-elements", type=_positive_int, default=None, metavar="N",
                    help=f"memory bound: decoder outputs per IWAE chunk (default: {CUDA_MAX_ELEMENTS:,} on CUDA, "
                         f"{CPU_MAX_ELEMENTS:,} elsewhere)")
    ev.add_argument("--ais", action="store_true",
                    help="also estimate log p(x) by annealed importance sampling (costly: see --ais-images)")
    ev.add_argument("--ais-steps", type=_positive_int, default=500, metavar="T",
                    help="AIS: intermediate distributions (sigmoidal schedule) (default: %(default)s)")
    ev.add_argument("--ais-chains", type=_positive_int, default=16, metavar="K",
                    help="AIS: chains per image (default: %(default)s)")
    ev.add_argument("--ais-images", type=_positive_int, default=100, metavar="N",
                    help="AIS on the first N test images only (default: %(default)s)")
    ev.add_argument("--ais-start", choices=("encoder", "prior"), default="encoder",
                    help="AIS start distribution: q(z|x) or p(z) (default: %(default)s)")
    ev.add_argument("--ais-transition", choices=("hmc", "mala"), default="hmc",
                    help="AIS transition: HMC (10 leapfrog steps) or MALA (default: %(default)s)")

    ref = sub.add_parser("reference", help="train, evaluate or list the book's reference models",
                         description="The book's reference models (vaelib.reference): trained to convergence once, "
                                     "shipped in vaelib/weights.")
    ref_sub = ref.add_subparsers(dest="action", required=True, parser_class=_OneLineParser, metavar="ACTION")
    rt = ref_sub.add_parser("train", help="train (or continue) reference models and export their best epochs")
    rt.add_argument("names", nargs="*", metavar="NAME", help="models to train (default: all)")
    rt.add_argument("--processes", type=int, default=None, help="models trained at once (default: one per core)")
    rt.add_argument("--runs", default=None, help="folder of the run directories (default: runs/reference)")
    re_ = ref_sub.add_parser("evaluate", help="test -ELBO and the k = 5000 IWAE NLL of stored reference models")
    re_.add_argument("names", nargs="*", metavar="NAME", help="models to evaluate (default: all)")
    ref_sub.add_parser("list", help="the registry as a Markdown table, with each stored model's figures")
    ref.add_argument("--data-root", default=None, help="folder holding the data set (default: the search path)")

    da = sub.add_parser("data", help="locate and verify (or download) a data set and print its folder",
                        description="Locate the four IDX files, verify their checksums and print the folder.")
    da.add_argument("name", metavar="NAME", help="fashion-mnist or mnist")
    da.add_argument("--root", metavar="DIR", help="look here first (and download here with --download)")
    da.add_argument("--download", action="store_true", help="download through torchvision if missing")
    for command in (tr, ev, da, ref):
        command.add_argument("--debug", action="store_true", help="on an error, also print the traceback")
    return parser


def _device(text: str | None):
    """The --device (else $VAELIB_DEVICE, else the best there is), tried now, before a run directory is made: one
    that is missing, that this torch was not built for (xpu, hip, vulkan...) or that holds no data (meta) is a
    DeviceUnavailableError, a ValueError: one line, exit 2."""
    import torch

    from vaelib.config import DEVICE_ENV, DeviceUnavailableError, available_devices, select_device

    source = "" if text is not None or not os.environ.get(DEVICE_ENV, "").strip() else f" (from ${DEVICE_ENV})"
    with warnings.catch_warnings():  # torch warns about device types it deprecates (mkldnn): the error says it all
        warnings.simplefilter("ignore")
        try:
            device = select_device(text)
        except DeviceUnavailableError as err:
            raise DeviceUnavailableError(f"{err}{source}") from None
        if device.type == "meta":  # tensors without data: every result would be missing
            raise DeviceUnavailableError(f"device 'meta'{source} holds shapes, not numbers: it cannot train or "
                                         f"evaluate; available: {', '.join(available_devices())}")
        try:
            (torch.ones(2, device=device) * 2).sum().cpu()
        except Exception as err:  # torch's RuntimeError/AssertionError/NotImplementedError for a backend it lacks
            raise DeviceUnavailableError(f"device {str(device)!r}{source} does not work here (this torch cannot run "
                                         f"on it; --debug shows why); available: {', '.join(available_devices())}"
                                         ) from err
    return device


def _load_images(dataset: str, split: str, root, binarize: str, seed: int, size: int | None,
                 size_option: str = "--test-size", recorded_in: Path | None = None):
    """A split's images (the first ``size``); ``recorded_in``: the run whose run_info gave ``root``."""
    from vaelib.data import DataNotFoundError, load_split

    # Training data for dynamic binarisation stay grey (fit redraws them every epoch); the test set is drawn once.
    mode = {"none": None, "threshold": "threshold", "dynamic": "dynamic" if split == "test" else None}[binarize]
    try:
        data = load_split(dataset, split, root, binarize=mode, seed=seed)
    except DataNotFoundError as err:
        if recorded_in is None or root is None:
            raise
        raise DataNotFoundError(f"{err} (that folder was recorded in the run {recorded_in}; --data-root DIR "
                                "overrides it)") from None
    images, labels = data.images, data.labels
    if size is not None:
        if size > len(images):
            warnings.warn(f"{size_option} {size} is more than the {len(images)} {split} images of {dataset}; "
                          f"all {len(images)} are used", stacklevel=2)
        images, labels = images[:size], labels[:size]
    return images, labels, data.source


def _check_writable(folder: Path, option: str) -> None:
    """Fail now, not after minutes of work, if ``folder`` (or the folder that would hold it) cannot be written."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f": {existing}"
        raise CommandLineError(f"{option} {folder}{where} is not a directory")
    if existing != folder:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise CommandLineError(f"{option} {folder}: permission denied: cannot create it in {existing}")
        return
    try:  # a real file, not os.access: also catches a read-only file system, ACLs and root squash
        probe = tempfile.TemporaryFile(dir=folder, prefix=".vaelib-write-test.")
    except OSError as err:
        raise CommandLineError(f"{option} {folder}: cannot write there ({_describe_os_error(err, bare=True)})") from err
    probe.close()


def _resume_options(args, out: Path) -> dict:
    """For --resume: the run's model config, after taking the run's value for every RUN_OPTIONS option not given
    and refusing one given with another value."""
    from vaelib.runs import CHECKPOINT_NAME, RunNotFoundError, load_checkpoint

    if not out.is_dir():
        raise RunNotFoundError(f"run directory {out} does not exist (nothing to resume)")
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    saved = (ckpt.get("run_info") or {}).get("options") or {}
    _check_saved_options(saved, f"checkpoint {out / CHECKPOINT_NAME}: run_info.options")
    given = _given(args.argv)

    def same(a, b) -> bool:
        return (list(a) if isinstance(a, tuple | list) else a) == (list(b) if isinstance(b, tuple | list) else b)

    def lowered_lr(d: str) -> bool:  # a smaller --lr is allowed (see --resume's help); fit checks it again
        return d == "lr" and saved[d] is not None and given[d] < saved[d]

    differ = [f"{_option(d)} {given[d]!r} is not the run's {saved[d]!r}" for d in RUN_OPTIONS
              if d in given and d in saved and not same(given[d], saved[d]) and not lowered_lr(d)]
    if differ:
        raise CommandLineError(f"cannot resume {out} with other options: {'; '.join(differ)} (on resume only "
                               f"{', '.join(map(_option, CHANGEABLE_ON_RESUME))} and --device may change; to start "
                               "afresh, use --overwrite)")
    for dest in RUN_OPTIONS + CHANGEABLE_ON_RESUME:
        if dest in saved and dest not in given:
            setattr(args, dest, tuple(saved[dest]) if dest == "hidden" and saved[dest] else saved[dest])
    return ckpt.get("model_config") or {}


def _check_saved_options(saved: dict, where: str) -> None:
    """The train options a run recorded, checked as the parser checks typed ones (a resume sets them on args)."""
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    for dest, value in saved.items():
        action = actions.get(dest)
        if action is None or value is None:
            continue
        try:
            if action.choices is not None:
                ok = value in action.choices
            elif action.type is None:
                ok = isinstance(value, str)
            elif isinstance(value, bool) or not isinstance(value, int | float | list | tuple):
                ok = False
            else:
                listed = isinstance(value, list | tuple)
                ok = action.type(",".join(map(str, value)) if listed else str(value)) == (
                    tuple(value) if listed else value)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CommandLineError(f"{where}.{dest} is {value!r}, not a value {_option(dest)} accepts")


def _memory_hint(args) -> str:
    """The option that most likely made the work too large: of those that size it, the one given furthest above
    its default."""
    from vaelib.objectives import CPU_MAX_ELEMENTS

    sizes = {"train": (("latent", 20), ("hidden", 400), ("pseudo_inputs", 500), ("k", 1), ("batch_size", 128)),
             "eval": (("ais_chains", 16), ("ais_images", 100), ("iwae_k", 5000), ("max_elements", CPU_MAX_ELEMENTS),
                      ("iwae_images", 10000), ("test_size", 10000))}.get(args.command, ())

    def ratio(dest: str, default: int) -> float:
        value = getattr(args, dest, None)
        value = max(value) if isinstance(value, tuple | list) and value else value
        return value / default if isinstance(value, int) and not isinstance(value, bool) else 0

    ranked = sorted(sizes, key=lambda s: ratio(*s), reverse=True)
    if not ranked:
        return "out of memory"
    dest, default = ranked[0]
    if ratio(dest, default) > 1:
        value = getattr(args, dest)
        shown = ",".join(map(str, value)) if isinstance(value, tuple | list) else value
        return f"out of memory: {_option(dest)} {shown} makes the work too large; try a smaller value"
    smaller = "--batch-size" if args.command == "train" else "--max-elements or --ais-chains"
    return f"out of memory; try a smaller {smaller}"


def _check_train_combinations(args) -> None:
    """Options that only make sense together: one clear line (exit 2) before any data are read."""
    if args.pseudo_inputs is not None and args.prior != "vamp":
        raise CommandLineError("--pseudo-inputs is the VampPrior's number of components; use it with --prior vamp")
    if args.k is not None and args.objective != "iwae":
        raise CommandLineError("--k is the IWAE bound's number of samples; use it with --objective iwae")
    if args.objective == "iwae" and args.k is None:
        raise CommandLineError("--objective iwae needs --k K, the number of importance samples (e.g. --k 5)")
    if args.objective == "iwae" and (args.beta != 1 or args.warmup_epochs):
        raise CommandLineError("--objective iwae has no KL weight: --beta and --warmup-epochs do not apply")
    if args.prior == "vamp" and args.kl == "analytic":
        raise CommandLineError("--prior vamp has no closed-form KL; use --kl mc (the default for it)")


def _train_settings(args):
    """The run's settings (:class:`vaelib.settings.TrainSettings`) from the train options: the one object fit
    trains by, records in run.json and compares with the run's on --resume."""
    from vaelib.settings import TrainSettings

    return TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_final=args.lr_final,
                         beta=args.beta, warmup_epochs=args.warmup_epochs, binarize=args.binarize == "dynamic",
                         seed=args.seed, kl=args.kl, objective=args.objective, k=args.k,
                         checkpoint_every=args.checkpoint_every)


def cmd_train(args) -> int:
    import torch

    from vaelib.models import build_vae
    from vaelib.training import TrainingDivergedError, TrainingInterrupted, TrainingOutOfMemory, fit

    device = _device(args.device)
    out = Path(args.out)
    _check_writable(out, "--out")
    if args.resume and args.overwrite:
        raise CommandLineError("--resume and --overwrite contradict each other")
    root_given = args.data_root is not None
    config = _resume_options(args, out) if args.resume else {}
    _check_train_combinations(args)
    settings = _train_settings(args)  # checked now, before any data are read
    if args.data_root is not None:  # stored absolute: eval and resume may run from another working directory
        args.data_root = os.path.abspath(args.data_root)
    recorded_in = out if args.resume and not root_given else None
    train_x, _, data_path = _load_images(args.dataset, "train", args.data_root, args.binarize, args.seed,
                                         args.train_size, "--train-size", recorded_in)
    test_x = None
    if args.test_size != 0:
        test_x, _, _ = _load_images(args.dataset, "test", args.data_root, args.binarize, args.seed, args.test_size,
                                    "--test-size", recorded_in)
    torch.manual_seed(args.seed)  # the initial weights
    if config:  # resuming: the run's model, whatever the defaults say (the weights come from the checkpoint)
        model = build_vae(**config)
    else:
        prior = {} if args.prior == "standard" else {"prior": args.prior, "pseudo_inputs": args.pseudo_inputs or 500}
        model = build_vae(args.arch, input_dim=train_x.shape[1], latent_dim=args.latent, hidden=args.hidden,
                          activation=args.activation, likelihood=args.likelihood, sigma=args.sigma,
                          posterior=args.posterior, **prior)
    options = {d: getattr(args, d) for d in RUN_OPTIONS + CHANGEABLE_ON_RESUME}
    run_info = {"dataset": args.dataset, "data_root": args.data_root, "data_path": str(data_path),
                "binarize": args.binarize, "train_size": args.train_size, "test_size": args.test_size,
                "seed": args.seed, "options": options, "command": "python -m vaelib " + shlex.join(args.argv)}
    try:
        result = fit(model, train_x, test_x, settings, device=device, out_dir=out, resume=args.resume,
                     overwrite=args.overwrite, fast=args.fast, progress=not args.no_progress, run_info=run_info)
    except TrainingDivergedError as err:
        if err.checkpoint is None or settings.beta > torch.finfo(torch.float32).max:
            raise
        lr = settings.lr / 10  # a resume may lower --lr (see --resume's help): what to try first
        raise TrainingDivergedError(f"{err} Continue from it with a smaller step, e.g.: python -m vaelib train --out "
                                    f"{shlex.quote(str(out))} --resume --lr {lr:g}", err.epoch, err.step,
                                    err.checkpoint, err.history) from None
    except (TrainingInterrupted, TrainingOutOfMemory) as stop:
        argv = [a for a in args.argv if a not in ("--resume", "--overwrite")] + ["--resume"]
        where = (f"a resumable checkpoint (epoch {stop.epoch}) is in {stop.checkpoint}"
                 if stop.checkpoint is not None else "nothing was saved")
        what = (f"interrupted{_signal_words()}" if isinstance(stop, TrainingInterrupted)
                else f"error: {_memory_hint(args)}")
        print(f"vaelib train: {what}; {where}. Resume with: python -m vaelib {shlex.join(argv)}", file=sys.stderr)
        return _interrupted_exit_code() if isinstance(stop, TrainingInterrupted) else EXIT_ERROR
    if args.resume and result.resumed_from >= settings.epochs:
        print(f"nothing to train: the run in {args.out} has {result.resumed_from} of --epochs {settings.epochs} epochs "
              "already (give a larger --epochs to continue it)")
        return EXIT_OK
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k}={last[k]:.3f}" for k in ("train_loss", "test_elbo") if k in last)
    secs = sum(result.seconds_per_epoch)
    print(f"trained {len(result.history)} epochs on {result.device} ({result.fast}; {secs:.1f} s this session)"
          f"{': ' + summary if summary else ''}; run saved in {args.out}")
    return EXIT_OK


def cmd_eval(args) -> int:
    import torch

    from vaelib.ais import ais_log_likelihood
    from vaelib.evaluation import active_units, evaluate_elbo, has_kl_per_dimension, iwae_nll, kl_per_dimension
    from vaelib.runs import CHECKPOINT_NAME, EVAL_JSON, RunLock, RunNotFoundError, load_run, write_json

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RunNotFoundError(f"run directory {run_dir} does not exist")
    device = _device(args.device)
    if not (run_dir / CHECKPOINT_NAME).is_file():  # before the lock: no .lock is left in a folder that is no run
        raise RunNotFoundError(f"{run_dir} is not a run directory: it has no {CHECKPOINT_NAME} (written by `train`)")
    _check_writable(run_dir, "RUN_DIR")  # before minutes of IWAE, not after
    with RunLock(run_dir):  # no trainer writes the run while it is evaluated
        run = load_run(run_dir, device=device)
        info = run.run_info  # the checkpoint's: run.json may be missing
        if "dataset" not in info:
            raise CommandLineError(f"{run_dir}: the checkpoint does not say which data set the model was trained on "
                                   "(a run made by fit() without run_info?)")
        root = args.data_root or info.get("data_root")
        test_x, _, _ = _load_images(info["dataset"], "test", root, info.get("binarize", "none"),
                                    info.get("seed", 0), args.test_size, "--test-size",
                                    None if args.data_root else run_dir)
        model = run.model
        torch.manual_seed(args.seed)
        results: dict = {"run_dir": str(run_dir), "epoch": run.epoch, "test_images": len(test_x)}
        results.update({f"test_{k}": v for k, v in evaluate_elbo(model, test_x).items()})
        count, variances = active_units(model, test_x)
        results["active_units"] = count
        results["latent_dim"] = model.latent_dim
        results["au_variances"] = [round(v, 6) for v in variances.tolist()]
        results["kl_per_dimension"] = ([round(v, 6) for v in kl_per_dimension(model, test_x).tolist()]
                                       if has_kl_per_dimension(model) else None)
        if args.iwae_k > 0:
            n = min(len(test_x), args.iwae_images or len(test_x))
            results["iwae_k"], results["iwae_images"] = args.iwae_k, n
            results["iwae_nll"] = iwae_nll(model, test_x[:n], k=args.iwae_k, max_elements=args.max_elements)
        if args.ais:
            n = min(len(test_x), args.ais_images)
            ais = ais_log_likelihood(model, test_x[:n], n_steps=args.ais_steps, n_chains=args.ais_chains,
                                     start=args.ais_start, transition=args.ais_transition, batch_size=100,
                                     seed=args.seed)
            nll = -ais.log_px.double().cpu()
            results.update(ais_steps=args.ais_steps, ais_chains=args.ais_chains, ais_images=n,
                           ais_start=args.ais_start, ais_transition=args.ais_transition,
                           ais_nll=nll.mean().item(),
                           ais_nll_se=(nll.std() / math.sqrt(n)).item() if n > 1 else None,
                           ais_ess_median=ais.ess.median().item())
        broken = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
        if broken:  # NaN is no result: a model of a diverged run (older vaelib versions saved such epochs)
            raise CommandLineError(f"the model in {run_dir} (epoch {run.epoch}) gives a NaN or infinite "
                                   f"{', '.join(broken)}: its weights are broken; nothing was written")
        write_json(run_dir / EVAL_JSON, results)  # atomic, strict JSON: never a torn eval.json
    print(f"run {run_dir} (epoch {run.epoch}), {len(test_x)} test images")
    print(f"  test ELBO        {results['test_elbo']:.3f} nats (rec {results['test_rec']:.3f}, "
          f"KL {results['test_kl']:.3f})")
    if "iwae_nll" in results:
        print(f"  IWAE NLL (k={args.iwae_k}, {results['iwae_images']} images)  {results['iwae_nll']:.3f} nats")
    if "ais_nll" in results:
        se = results["ais_nll_se"]
        print(f"  AIS NLL (T={args.ais_steps}, k={args.ais_chains}, {results['ais_images']} images)  "
              f"{results['ais_nll']:.3f}{f' +- {se:.3f}' if se is not None else ''} nats")
    print(f"  active units     {count} of {model.latent_dim} (Var_x E_q[z_j] > 0.01)")
    print(f"  written to {run_dir / EVAL_JSON}")
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


def _describe_os_error(err: OSError, bare: bool = False) -> str:
    """An OSError as one line that names the fault in plain words (permission, not a directory, no space)."""
    if err.errno is None:  # raised with a message only (vaelib's own FileNotFoundErrors)
        return str(err)
    what = {errno.EACCES: "permission denied", errno.EPERM: "permission denied (operation not permitted)",
            errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory, not a file",
            errno.EEXIST: "already exists", errno.EROFS: "read-only file system",
            errno.ENOENT: "no such file or directory"}.get(err.errno, err.strerror or str(err))
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return what if bare or not names else f"{what}: {' -> '.join(names)}"


_signals: list[int] = []  # the signals turned into KeyboardInterrupt during the current command
#: Stops handled like Ctrl-C: SIGTERM (a scheduler's or `kill`'s) and SIGHUP (a dropped SSH session or terminal).
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM and SIGHUP handled like Ctrl-C: training saves its pending epochs first."""
    _signals.clear()

    def handler(signum, frame):
        _signals.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _signal_words() -> str:
    return f" by {signal.Signals(_signals[-1]).name}" if _signals else ""


def _interrupted_exit_code() -> int:
    return 128 + _signals[-1] if _signals else EXIT_INTERRUPTED


def _one_line_warnings(prefix: str):
    from vaelib.data import DataNote

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        kind = "note" if issubclass(category, DataNote) else "warning"
        print(f"{prefix}: {kind}: {' '.join(str(message).split())}", file=sys.stderr)

    return show


def cmd_reference(args) -> int:
    from vaelib import reference

    names = list(getattr(args, "names", None) or reference.REFERENCES)
    for name in names:
        reference.spec(name)  # an unknown name is one line before anything starts
    if args.action == "train":
        runs = args.runs or reference.RUNS_DIR
        results = reference.train(names, args.processes, runs, args.data_root,
                                  log=lambda line: print(line, flush=True))
        failed = [r["name"] for r in results if "error" in r or r.get("interrupted")]
        if failed:
            raise reference.ReferenceError(f"not finished: {', '.join(failed)}; run the same command to continue")
        return 0
    if args.action == "evaluate":
        for name in names:
            r = reference.evaluate(name, data_root=args.data_root)
            print(f"{name:>14}  test -ELBO {r['neg_elbo']:.2f} ± {r['neg_elbo_se']:.2f}  NLL (k = {r['nll_k']}, "
                  f"{r['nll_n']} images) {r['nll']:.2f} ± {r['nll_se']:.2f}  ({r['seconds']:.0f} s)", flush=True)
        return 0
    print("\n".join(reference.table()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while Python imports torch
        print("vaelib: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    args.argv = argv

    command = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "reference": cmd_reference}[args.command]
    prefix = f"vaelib {args.command}"

    def fail(message: str, code: int = EXIT_ERROR) -> int:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message held
        return code

    with warnings.catch_warnings(), _sigterm_as_interrupt():
        warnings.showwarning = _one_line_warnings(prefix)
        try:
            return command(args)
        except KeyboardInterrupt:
            return fail(f"interrupted{_signal_words()}", _interrupted_exit_code())
        # ValueError: an argument check of the library that the parser could not make (one line too; --debug
        # shows where it came from).
        except (VaelibError, ValueError) as err:
            return fail(f"error: {err}")
        except OSError as err:
            return fail(f"error: {_describe_os_error(err)}")
        except (MemoryError, RuntimeError) as err:  # torch's allocators raise RuntimeErrors
            if not is_out_of_memory(err):
                raise
            return fail(f"error: {_memory_hint(args)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
