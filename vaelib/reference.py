"""The book's reference models: every Fashion-MNIST model whose results a chapter interprets, trained once to
convergence by one command (``make reference``, i.e. ``python -m vaelib reference train``) and shipped with the
package, so that a chapter (and CI) evaluates the very models its text describes.

Each model is a :class:`ReferenceSpec` in :data:`REFERENCES`. Training one is an ordinary :func:`vaelib.training.fit`
run in ``runs/reference/<name>`` (resumable: the same command continues an interrupted run), on the first
:data:`N_TRAIN` training images; the last :data:`N_VALID` training images are the validation split (the test set is
never used for a choice). After every epoch the validation objective (the loss the model trains on: −ELBO, the
β-weighted loss, or −L_k) is recorded, and the weights of the best epoch so far are kept. When a run ends, those
weights are exported to ``vaelib/weights/<name>/`` as safetensors (a format that loading cannot run code from) with
the run's ``run.json`` and ``history.json``, and their SHA-256 goes into ``vaelib/weights/registry.json``.

Why package data and not a download: the weights (about 1.7-2.6 MB each in float32) then arrive with
``pip install`` of the book's repository, which every chapter's Colab cell already runs, so a chapter needs no
second network path and works offline; the checksum is verified at every :func:`load` all the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vaelib.errors import VaelibError

#: Where the shipped weights live (package data).
WEIGHTS_DIR = Path(__file__).with_name("weights")
REGISTRY_JSON = WEIGHTS_DIR / "registry.json"
#: Where ``reference train`` keeps its run directories (checkpoints for resuming; not shipped).
RUNS_DIR = Path("runs") / "reference"
DATASET = "fashion-mnist"
#: The training split is the first N_TRAIN training images, the validation split the last N_VALID.
N_TRAIN, N_VALID = 55_000, 5_000
#: Fixed draws: the validation images binarised (or dequantised) once; the test images as the chapters draw them.
VALID_SEED, TEST_BINARY_SEED, TRAIN_DEQUANTISE_SEED, VALID_DEQUANTISE_SEED, TEST_DEQUANTISE_SEED = 7, 2024, 3, 5, 4
#: Converged: the best validation objective improved by less than this over the last PLATEAU_FRACTION of epochs.
PLATEAU_NATS, PLATEAU_FRACTION = 0.1, 0.1
MODEL_FILE, RUN_FILE, HISTORY_FILE, TEST_FILE = "model.safetensors", "run.json", "history.json", "test.json"
BEST_FILE, VALID_FILE = "best.safetensors", "valid.json"


class ReferenceError(VaelibError):
    """A reference model that is missing, corrupt, or not the model its spec describes."""


#: The fields of a spec that are fit's settings of the same name (the data kind sets ``binarize``).
_SET_BY_SPEC = ("epochs", "batch_size", "lr", "lr_final", "beta", "warmup_epochs", "seed", "objective", "k")


@dataclass(frozen=True)
class ReferenceSpec:
    """One reference model: how it is built (``model``: :func:`vaelib.models.build_vae` arguments), on what data
    (``data``: "binarized" — redrawn every epoch, Burda et al. 2015 — or "dequantized": (v + u)/256 once), and how
    it is trained (the :func:`vaelib.training.fit` settings; Adam, lr decaying geometrically from ``lr`` to
    ``lr_final``)."""

    name: str
    summary: str
    chapters: tuple[int, ...]
    model: dict
    data: str = "binarized"
    epochs: int = 100
    lr: float = 1e-3
    lr_final: float = 1e-4
    batch_size: int = 128
    beta: float = 1.0
    warmup_epochs: int = 0
    objective: str = "elbo"
    k: int | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def train_settings(self):
        """The :class:`vaelib.settings.TrainSettings` the model is trained with (fit's defaults for the rest)."""
        from vaelib.settings import TrainSettings

        return TrainSettings(binarize=self.data == "binarized", **{name: getattr(self, name) for name in _SET_BY_SPEC})

    def fit_settings(self) -> dict:
        """The settings :func:`vaelib.training.fit` records in run.json that the spec fixes."""
        settings = self.train_settings()
        return {**{name: getattr(settings, name) for name in (*_SET_BY_SPEC, "binarize")}, "n_train": N_TRAIN}

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "chapters": list(self.chapters)}


_MLP20 = dict(arch="mlp", input_dim=784, latent_dim=20, hidden=(400,), likelihood="bernoulli")
_BETA_MLP = dict(arch="mlp", input_dim=784, latent_dim=32, hidden=(256,), likelihood="bernoulli")
_BURDA = dict(arch="burda")
BURDA_EPOCHS, MLP_EPOCHS, BETA_EPOCHS = 150, 120, 60
BETAS = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _beta_name(beta: float) -> str:
    return f"beta-{beta:g}"


def _specs() -> dict[str, ReferenceSpec]:
    specs = [
        ReferenceSpec("mlp20", "784-400-20 MLP, Bernoulli decoder", (6,), _MLP20, epochs=MLP_EPOCHS),
        ReferenceSpec("mlp2", "784-400-2 MLP, Bernoulli decoder (a 2-D latent space to draw)", (6,),
                      {**_MLP20, "latent_dim": 2}, epochs=MLP_EPOCHS),
        ReferenceSpec("mlp20-gaussian", "784-400-20 MLP, Gaussian decoder with one learned sigma, dequantised data",
                      (7, 11), {**_MLP20, "likelihood": "gaussian-learned", "sigma": 0.1}, data="dequantized",
                      epochs=MLP_EPOCHS),
        ReferenceSpec("burda", "Burda et al.'s 784-200-200-50 tanh VAE, Bernoulli decoder", (7, 11, 12, 13), _BURDA,
                      epochs=BURDA_EPOCHS),
        ReferenceSpec("burda-vamp", "as burda, VampPrior with 100 pseudo-inputs", (13,),
                      {**_BURDA, "prior": "vamp", "pseudo_inputs": 100}, epochs=BURDA_EPOCHS),
        ReferenceSpec("burda-iwae5", "as burda, trained on the IWAE bound L_5", (13,), _BURDA,
                      epochs=BURDA_EPOCHS, objective="iwae", k=5),
        ReferenceSpec("burda-fullcov", "as burda, full-covariance Gaussian posterior", (13,),
                      {**_BURDA, "posterior": "full"}, epochs=BURDA_EPOCHS),
    ]
    specs += [ReferenceSpec(_beta_name(b), f"784-256-32 MLP, Bernoulli decoder, beta = {b:g}", (9,), _BETA_MLP,
                            epochs=BETA_EPOCHS, beta=b) for b in BETAS]
    specs.append(ReferenceSpec("beta-1-warmup", "784-256-32 MLP, beta = 1 reached by a linear warm-up over 20 "
                               "epochs", (9,), _BETA_MLP, epochs=BETA_EPOCHS, warmup_epochs=20))
    return {s.name: s for s in specs}


#: The registry: name -> spec.
REFERENCES: dict[str, ReferenceSpec] = _specs()


def spec(name: str) -> ReferenceSpec:
    try:
        return REFERENCES[name]
    except KeyError:
        raise ReferenceError(f"no reference model {name!r}; the registry has {', '.join(REFERENCES)}") from None


def _regenerate(name: str) -> str:
    return f"regenerate it with `make reference NAME={name}` (python -m vaelib reference train {name})"


# ----------------------------------------------------------------------------------------------------------- data
def _dequantise(grey: Tensor, seed: int) -> Tensor:
    """(v + u) / 256 for the 8-bit values v = 255 * grey and u ~ U[0, 1) drawn with ``seed`` (chapter 7)."""
    levels = torch.round(grey * 255)
    noise = torch.rand(grey.shape, generator=torch.Generator().manual_seed(seed))
    return (levels + noise) / 256


def splits(data: str, root: str | os.PathLike | None = None, download: bool = False) -> dict[str, Tensor]:
    """The train, validation and test images a reference model of this ``data`` kind uses: "train" grey
    (binarised by fit every epoch) or dequantised once, "valid" and "test" binarised or dequantised once with fixed
    seeds. The test images are the chapters' (binarised with seed 2024, dequantised with seed 4)."""
    from vaelib.data import dynamic_binarize, load_split

    grey = load_split(DATASET, "train", root, download=download).images
    train, valid = grey[:N_TRAIN], grey[len(grey) - N_VALID:]
    test = load_split(DATASET, "test", root, download=download).images
    if data == "binarized":
        return {"train": train, "valid": dynamic_binarize(valid, torch.Generator().manual_seed(VALID_SEED)),
                "test": dynamic_binarize(test, torch.Generator().manual_seed(TEST_BINARY_SEED))}
    if data == "dequantized":
        return {"train": _dequantise(train, TRAIN_DEQUANTISE_SEED), "valid": _dequantise(valid, VALID_DEQUANTISE_SEED),
                "test": _dequantise(test, TEST_DEQUANTISE_SEED)}
    raise ValueError(f"data must be 'binarized' or 'dequantized', got {data!r}")


# ------------------------------------------------------------------------------------------------------- training
def valid_loss(s: ReferenceSpec, model: nn.Module, row: dict, valid: Tensor) -> float:
    """The validation value of the loss ``s`` trains on: −ELBO; D + βR for β ≠ 1 (the full β, also during a
    warm-up); −L_k for IWAE (k as in training; seeded, so epochs are compared on the same draws)."""
    if s.objective == "iwae":
        from vaelib.evaluation import iwae_bounds

        with torch.random.fork_rng():
            torch.manual_seed(VALID_SEED)
            return -iwae_bounds(model, valid, k=s.k).mean().item()
    return -row["test_rec"] + s.beta * row["test_kl"]


def plateau_gain(losses: list[float], fraction: float = PLATEAU_FRACTION) -> float | None:
    """How much the best loss so far fell over the last ``fraction`` of the epochs (None before 10 epochs)."""
    n = len(losses)
    if n < 10:
        return None
    m = max(1, math.ceil(fraction * n))
    return min(losses[: n - m]) - min(losses)


def converged(losses: list[float]) -> bool:
    gain = plateau_gain(losses)
    return gain is not None and gain < PLATEAU_NATS


def _save_weights(model: nn.Module, path: Path, metadata: dict) -> None:
    """The model's tensors as safetensors (atomically: a crash leaves the old file or the new one)."""
    from safetensors.torch import save

    from vaelib.runs import atomic_write

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    payload = save(tensors, metadata={k: json.dumps(v) for k, v in metadata.items()})
    atomic_write(path, lambda fh: fh.write(payload))


class _Tracker:
    """fit's callback: the validation loss of every epoch (``valid.json``) and the best epoch's weights."""

    def __init__(self, s: ReferenceSpec, run_dir: Path, valid: Tensor, log):
        self.spec, self.dir, self.valid, self.log = s, run_dir, valid, log
        self.rows = _read_valid(run_dir)

    def resume_at(self, epoch: int) -> None:
        """Forget rows of epochs after the checkpoint (a crash between the two writes)."""
        self.rows = [r for r in self.rows if r["epoch"] <= epoch]

    def __call__(self, row: dict, model: nn.Module) -> None:
        from vaelib.runs import write_json

        model.eval()
        loss = valid_loss(self.spec, model, row, self.valid)
        if not math.isfinite(loss):
            raise ReferenceError(f"{self.spec.name}: validation loss {loss} in epoch {row['epoch']}")
        best = min((r["valid_loss"] for r in self.rows), default=math.inf)
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]]
        self.rows.append({"epoch": row["epoch"], "valid_loss": loss, "seconds": row["seconds"]})
        if loss < best:
            _save_weights(model, self.dir / BEST_FILE, {"epoch": row["epoch"], "valid_loss": loss})
        write_json(self.dir / VALID_FILE, {"name": self.spec.name, "rows": self.rows})
        losses = [r["valid_loss"] for r in self.rows]
        gain = plateau_gain(losses)
        self.log(f"{self.spec.name:>14}  epoch {row['epoch']:>3}/{self.spec.epochs}  valid loss {loss:8.2f}  "
                 f"best {min(losses):8.2f}  gain over last 10% "
                 f"{'-' if gain is None else f'{gain:.3f}'}  {row['seconds']:.1f} s/epoch")


def _read_valid(run_dir: Path) -> list[dict]:
    path = run_dir / VALID_FILE
    if not path.exists():
        return []
    return list(json.loads(path.read_text())["rows"])


def train_one(name: str, runs_dir: str | os.PathLike = RUNS_DIR, threads: int = 1, data_root=None,
              log=print, weights_dir: Path | None = None) -> dict:
    """Train (or continue) one reference model in ``runs_dir/name`` and export its best epoch. Returns a summary."""
    from vaelib.models import build_vae
    from vaelib.runs import CHECKPOINT_NAME
    from vaelib.training import fit

    s = spec(name)
    torch.set_num_threads(threads)
    data = splits(s.data, data_root)
    run_dir = Path(runs_dir) / name
    resume = (run_dir / CHECKPOINT_NAME).exists()
    torch.manual_seed(s.seed)
    model = build_vae(**s.model)
    tracker = _Tracker(s, run_dir, data["valid"], log)
    if resume:
        from vaelib.runs import load_checkpoint

        done = int(load_checkpoint(run_dir / CHECKPOINT_NAME)["epoch"])
        if done >= s.epochs:  # finished: export only (a resume would record this call's commit as the trainer's)
            export(name, runs_dir, weights_dir)
            return {"name": name, "epochs": done, "seconds": 0.0}
        tracker.resume_at(done)
    t0 = time.perf_counter()
    result = fit(model, data["train"], data["valid"], s.train_settings(), device="cpu", out_dir=run_dir,
                 resume=resume, progress=False, callback=tracker,
                 run_info={"reference": name, "threads": threads, "commit": _commit()})
    wall = time.perf_counter() - t0
    export(name, runs_dir, weights_dir)
    return {"name": name, "epochs": len(result.history), "seconds": wall}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export(name: str, runs_dir: str | os.PathLike = RUNS_DIR, weights_dir: Path | None = None) -> Path:
    """Copy a finished run's best epoch to the package: model.safetensors, run.json (with the spec, the best epoch
    and the convergence measure) and history.json; record the SHA-256 in the registry."""
    from filelock import FileLock
    from safetensors import safe_open

    from vaelib.runs import atomic_write, read_json, read_run_json, write_json

    s = spec(name)
    run_dir = Path(runs_dir) / name
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    run = read_run_json(run_dir / RUN_FILE)
    history = read_json(run_dir / HISTORY_FILE)
    history = history["history"] if isinstance(history, dict) else history
    rows = _read_valid(run_dir)
    if len(history) != s.epochs or [r["epoch"] for r in rows] != [h["epoch"] for h in history]:
        raise ReferenceError(f"{name}: the run in {run_dir} is not finished ({len(history)} of {s.epochs} epochs, "
                             f"{len(rows)} validation rows); continue it with `python -m vaelib reference train "
                             f"{name}`")
    losses = [r["valid_loss"] for r in rows]
    best = min(range(len(rows)), key=lambda i: losses[i])
    with safe_open(run_dir / BEST_FILE, framework="pt") as f:
        stored_epoch = json.loads(f.metadata()["epoch"])
    if stored_epoch != rows[best]["epoch"]:
        raise ReferenceError(f"{name}: {BEST_FILE} holds epoch {stored_epoch}, the best validation epoch is "
                             f"{rows[best]['epoch']}; {_regenerate(name)} after removing {run_dir}")
    out = weights_dir / name
    out.mkdir(parents=True, exist_ok=True)
    payload = (run_dir / BEST_FILE).read_bytes()
    atomic_write(out / MODEL_FILE, lambda fh: fh.write(payload))
    write_json(out / HISTORY_FILE, {"history": history, "valid": rows})
    write_json(out / RUN_FILE, {**run, "reference": {
        "spec": s.as_dict(), "best_epoch": rows[best]["epoch"], "best_valid_loss": losses[best],
        "plateau_gain": plateau_gain(losses), "converged": converged(losses),
        "train_seconds": sum(r["seconds"] for r in rows), "n_train": N_TRAIN, "n_valid": N_VALID}})
    with FileLock(str(weights_dir / ".registry.lock")):  # models finishing at once must not lose an entry
        registry = _read_registry(weights_dir)
        registry[name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        write_json(weights_dir / "registry.json", dict(sorted(registry.items())))
    return out


def _read_registry(weights_dir: Path = WEIGHTS_DIR) -> dict:
    path = Path(weights_dir) / "registry.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReferenceError(f"{path} is unreadable ({err}); restore it from the repository") from None


# -------------------------------------------------------------------------------------------------------- loading
def _stored(name: str, weights_dir: Path | None = None) -> tuple[Path, dict]:
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    folder = weights_dir / name
    entry = _read_registry(weights_dir).get(name)
    if entry is None or not (folder / MODEL_FILE).is_file():
        raise ReferenceError(f"reference model {name!r} is not in {weights_dir} (no weights or no registry entry); "
                             f"{_regenerate(name)}")
    return folder, entry


def info(name: str, weights_dir: Path | None = None) -> dict:
    """The stored run.json of a reference model (fit's settings, the spec, the best epoch, convergence)."""
    folder, _ = _stored(name, weights_dir)
    from vaelib.runs import read_run_json

    return read_run_json(folder / RUN_FILE)


def history(name: str, weights_dir: Path | None = None) -> dict:
    """The stored training curve: {"history": fit's rows, "valid": the validation loss per epoch}."""
    folder, _ = _stored(name, weights_dir)
    return json.loads((folder / HISTORY_FILE).read_text())


def test_results(name: str, weights_dir: Path | None = None) -> dict | None:
    """``reference evaluate``'s stored test figures, or None where not yet measured."""
    folder, _ = _stored(name, weights_dir)
    path = folder / TEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


def load(name: str, device: str | torch.device | None = None, weights_dir: Path | None = None) -> nn.Module:
    """The reference model ``name`` in eval mode on ``device`` (default: :func:`vaelib.config.select_device`),
    after checking the weights' SHA-256 against the registry and the stored settings against the spec."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    from vaelib.config import select_device
    from vaelib.models import build_vae

    s = spec(name)
    folder, entry = _stored(name, weights_dir)
    payload = (folder / MODEL_FILE).read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != entry.get("sha256"):
        raise ReferenceError(f"reference model {name!r}: {folder / MODEL_FILE} is corrupt (SHA-256 {digest[:12]}..., "
                             f"the registry records {str(entry.get('sha256'))[:12]}...); {_regenerate(name)} or "
                             "restore the file from the repository")
    from vaelib.runs import read_run_json

    stored = read_run_json(folder / RUN_FILE)
    model = build_vae(**s.model)
    expected = _plain(model.config)
    if _plain(stored.get("model_config")) != expected:
        raise ReferenceError(f"reference model {name!r}: the stored model {stored.get('model_config')} is not the "
                             f"spec's {expected}; {_regenerate(name)}")
    settings = stored.get("settings", {})
    wrong = {k: (settings.get(k), v) for k, v in s.fit_settings().items() if settings.get(k) != v}
    if wrong:
        raise ReferenceError(f"reference model {name!r} was trained with settings other than its spec's "
                             f"(stored, spec): {wrong}; {_regenerate(name)}")
    try:
        state = load_bytes(payload)
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError) as err:
        raise ReferenceError(f"reference model {name!r}: {folder / MODEL_FILE} does not fit the model "
                             f"({' '.join(str(err).split())[:200]}); {_regenerate(name)}") from None
    return model.to(select_device(device)).eval()


def _plain(obj):
    """JSON's view of a value (tuples become lists), so a stored config compares with a built one."""
    return json.loads(json.dumps(obj))


# ----------------------------------------------------------------------------------------------------- evaluation
#: The test figures of ``reference evaluate``: the ELBO on every test image, the k = 5000 IWAE bound (Burda et al.'s
#: NLL estimate) on the first N_NLL_IMAGES of them (about 30 s per model on one core, where all 10,000 take 5 min).
NLL_K, N_NLL_IMAGES = 5000, 1000


def _mean_se(values: Tensor) -> tuple[float, float]:
    from vaelib.evaluation import _se

    v = values.double()
    return v.mean().item(), _se(v)


def evaluate(name: str, weights_dir: Path | None = None, data_root=None, n_nll: int = N_NLL_IMAGES,
             k: int = NLL_K) -> dict:
    """Test −ELBO (all test images), rate and distortion, and −L_5000 (first ``n_nll``), each with its standard
    error, written to the model's test.json (with the weights' SHA-256: weights measured already are skipped)."""
    from vaelib.evaluation import iwae_bounds
    from vaelib.objectives import default_kl, elbo
    from vaelib.runs import write_json

    s = spec(name)
    folder, entry = _stored(name, weights_dir)
    previous = test_results(name, weights_dir)
    if previous is not None and previous.get("sha256") == entry["sha256"] and previous.get("nll_n") == n_nll \
            and previous.get("nll_k") == k:
        return previous  # measured on these very weights already
    model = load(name, "cpu", weights_dir)
    test = splits(s.data, data_root)["test"]
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.random.fork_rng():
        torch.manual_seed(0)
        parts = [elbo(model, xb, kl=default_kl(model)) for xb in test.split(1000)]
        elbos = torch.cat([p.elbo for p in parts])
        rate = torch.cat([p.kl for p in parts])
        nll = -iwae_bounds(model, test[:n_nll], k=k)
    neg_elbo, neg_elbo_se = _mean_se(-elbos)
    rate_mean, rate_se = _mean_se(rate)
    nll_mean, nll_se = _mean_se(nll)
    result = {"name": name, "n_test": len(test), "neg_elbo": neg_elbo, "neg_elbo_se": neg_elbo_se,
              "rate": rate_mean, "rate_se": rate_se, "distortion": neg_elbo - rate_mean,
              "nll_k": k, "nll_n": n_nll, "nll": nll_mean, "nll_se": nll_se,
              "seconds": time.perf_counter() - t0, "torch": torch.__version__, "sha256": entry["sha256"]}
    write_json(folder / TEST_FILE, result)
    return result


def table(weights_dir: Path | None = None) -> list[str]:
    """The registry as a Markdown table (the README's): each model, its chapters, its best epoch of its epochs and
    whether the plateau criterion held, its test figures with standard errors and its training time here."""
    lines = ["| model | what it is | chapters | best epoch / epochs (converged) | test −ELBO | test NLL, "
             f"k = {NLL_K} (first {N_NLL_IMAGES:,} images) | training time |",
             "|---|---|---|---|---|---|---|"]
    for name, s in REFERENCES.items():
        try:
            stored = info(name, weights_dir)["reference"]
        except ReferenceError:
            lines.append(f"| `{name}` | {s.summary} | {', '.join(map(str, s.chapters))} | not trained | | | |")
            continue
        test = test_results(name, weights_dir) or {}
        elbo_text = f"{test['neg_elbo']:.2f} ± {test['neg_elbo_se']:.2f}" if test else "not measured"
        nll_text = f"{test['nll']:.2f} ± {test['nll_se']:.2f}" if test else "not measured"
        lines.append(f"| `{name}` | {s.summary} | {', '.join(map(str, s.chapters))} | {stored['best_epoch']} / "
                     f"{s.epochs} ({'yes' if stored['converged'] else 'no'}) | {elbo_text} | {nll_text} | "
                     f"{stored['train_seconds'] / 60:.0f} min |")
    return lines


# ---------------------------------------------------------------------------------------------------- many at once
def _worker(job: tuple) -> dict:
    name, runs_dir, threads, data_root, weights_dir = job
    try:
        return train_one(name, runs_dir, threads, data_root, log=lambda line: print(line, flush=True),
                         weights_dir=weights_dir)
    except KeyboardInterrupt:
        return {"name": name, "interrupted": True}
    except VaelibError as err:
        return {"name": name, "error": " ".join(str(err).split())}


def train(names: list[str] | None = None, processes: int | None = None, runs_dir: str | os.PathLike = RUNS_DIR,
          data_root=None, log=print, weights_dir: Path | None = None) -> list[dict]:
    """Train the named reference models (default: all), one process per model, ``processes`` at a time (default:
    one per core), each with cores // processes threads: the book's networks are too small for one model to use
    several cores well (:func:`vaelib.config.set_cpu_threads`). The longest runs start first."""
    import multiprocessing

    names = list(names or REFERENCES)
    for n in names:
        spec(n)
    cores = os.cpu_count() or 1
    processes = max(1, min(processes or cores, len(names)))
    threads = max(1, cores // processes)
    order = sorted(names, key=_cost, reverse=True)
    log(f"training {len(order)} reference models, {processes} at a time, {threads} thread(s) each, in {runs_dir}")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per model: no torch state shared
    jobs = [(n, str(runs_dir), threads, data_root, weights_dir) for n in order]
    results = []
    with ctx.Pool(processes, maxtasksperchild=1) as pool:
        for r in pool.imap_unordered(_worker, jobs):
            results.append(r)
            if "error" in r:
                log(f"{r['name']}: error: {r['error']}")
            elif r.get("interrupted"):
                log(f"{r['name']}: interrupted; run the same command again to continue")
            else:
                log(f"{r['name']}: done, {r['epochs']} epochs in {r['seconds']:.0f} s, exported to "
                    f"{Path(weights_dir or WEIGHTS_DIR) / r['name']}")
    return results


def _cost(name: str) -> float:
    s = REFERENCES[name]
    per_epoch = (s.k or 1) * 0.5 + 0.5 if s.objective == "iwae" else 1.0
    return s.epochs * per_epoch
