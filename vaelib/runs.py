"""The run directory: what :func:`vaelib.training.fit` writes and :func:`load_run` and ``eval`` read, and the rules
that keep a run whole.

A run directory holds
  * ``checkpoint.pt`` — model and optimizer state, RNG states, epoch, history and what defines the run (tensors and
    plain containers only, so it loads with ``torch.load(..., weights_only=True)``: a checkpoint cannot run code);
  * ``history.json`` and ``history.csv`` — one row per epoch;
  * ``run.json`` — the model config and the fit settings, human-readable; ``eval.json`` — ``vaelib eval``'s results
    (removed when a later checkpoint replaces the one it evaluated);
  * ``.lock`` — the run lock: one writer at a time (training or eval), released by the OS if its holder dies.

Every file is written through :func:`atomic_write` (a crash leaves the old file or the new one, never a torn one),
with the mode the umask gives; JSON is strict (no NaN), and what is read back is checked against one schema
(:func:`check_fields`), so a damaged or hand-edited file is one line naming the file and the field. A run is
never overwritten unless asked, and resuming checks that it is the same run (:func:`check_resumable`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from torch import Tensor, nn

from vaelib.errors import VaelibError

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
RUN_JSON = "run.json"
EVAL_JSON = "eval.json"
LOCK_NAME = ".lock"
#: 2 adds the data fingerprint and the full settings (format 1 checkpoints still load and resume).
CHECKPOINT_FORMAT = 2
_READABLE_FORMATS = (1, 2)
_RUN_FILES = (CHECKPOINT_NAME, RUN_JSON, HISTORY_JSON, HISTORY_CSV, EVAL_JSON)
# The temp files of atomic_write: ".<name>.<random>.tmp"; a SIGKILL leaves them behind.
_TEMP_FILE = re.compile(r"^\.(" + "|".join(re.escape(n) for n in _RUN_FILES) + r")\..+\.tmp$")
#: Settings a resumed run may change: the total number of epochs (a schedule with lr_final then decays to the new
#: last epoch; the history records each epoch's lr), and how often it is saved. The lr may also be lowered (never
#: raised): what one tries after a divergence, which restores the last good epoch.
CHANGEABLE_ON_RESUME = ("epochs", "checkpoint_every")
BINARIZE_MODES = ("none", "dynamic", "threshold")


class RunError(VaelibError):
    """A problem with a run directory."""


class RunNotFoundError(RunError, FileNotFoundError):
    """A run directory or its checkpoint does not exist."""


class RunExistsError(RunError, FileExistsError):
    """Training would overwrite a run without being asked to."""


class RunLockedError(RunError):
    """Another process holds the run (its PID, when known, is ``pid``)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class CheckpointError(RunError):
    """A checkpoint that is corrupt, truncated, or not one vaelib wrote."""


class RunFileError(RunError, ValueError):
    """run.json or a checkpoint whose fields have the wrong shape or type (:func:`check_fields`)."""


class RunWriteError(RunError, OSError):
    """A run file could not be written (e.g. no space left); the message names the file and the epoch kept."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(message)
        self.message = message
        self.errno, self.filename = cause.errno, cause.filename

    def __str__(self) -> str:  # OSError's own would print "[Errno 28] ..." once errno is set
        return self.message


class RunMismatchError(RunError, ValueError):
    """Resuming with settings that differ from the run's; ``differences`` lists (name, run's value, given value)."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]]):
        super().__init__(message)
        self.differences = differences


@dataclass
class LoadedRun:
    model: nn.Module
    history: list[dict]
    epoch: int
    config: dict
    run: dict = field(default_factory=dict)
    run_dir: Path | None = None
    #: what the run was trained on (data set, binarisation, seed...), from the checkpoint: the source of truth
    run_info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ the schema
# Every field vaelib reads back from a run, with its kind; a field that is absent is fine (older formats), one of
# another kind is a RunFileError naming the file and the field, never a traceback deep in the code that uses it.
_MODEL_CONFIG = {"arch": "str", "input_dim": "count", "latent_dim": "count", "hidden": "counts", "activation": "str",
                 "likelihood": "str", "sigma": "number", "mean_activation": "str", "image_shape": "counts",
                 "posterior": "str", "prior": "str", "pseudo_inputs": "count"}
_RUN_INFO = {"dataset": "str", "data_root": "str?", "data_path": "str?", "binarize": BINARIZE_MODES,
             "train_size": "count?", "test_size": "int?", "seed": "integer", "options": "dict", "command": "str"}
_SETTINGS = {"epochs": "int", "batch_size": "count", "lr": "number", "lr_final": "number?", "beta": "number",
             "warmup_epochs": "int", "seed": "integer", "checkpoint_every": "count"}
CHECKPOINT_SCHEMA = {"format": _READABLE_FORMATS, "epoch": "int", "model_state": "tensors", "history": "rows",
                     "model_config": _MODEL_CONFIG, "optimizer_state": "dict", "rng": "dict", "settings": _SETTINGS,
                     "run_info": _RUN_INFO}
RUN_JSON_SCHEMA = {"model_config": _MODEL_CONFIG, "settings": _SETTINGS, "run_info": _RUN_INFO}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_KINDS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "integer": (_is_int, "an integer"),
    "int": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "count": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "number": (_finite, "a finite number"),
    "counts": (lambda v: isinstance(v, list | tuple) and all(_is_int(w) and w >= 1 for w in v), "a list of positive "
               "integers"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "tensors": (lambda v: isinstance(v, dict) and all(isinstance(t, Tensor) for t in v.values()), "tensors by name"),
    "rows": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of rows"),
}


def _check_value(value, kind, where: str) -> None:
    if isinstance(kind, dict):  # a nested object: the same rules for the fields listed
        if not isinstance(value, dict):
            raise RunFileError(f"{where} is {_shown(value)}, not an object")
        for key, sub in value.items():
            if key in kind:
                _check_value(sub, kind[key], f"{where}.{key}")
            elif kind is _MODEL_CONFIG:  # what build_vae(**config) would be given: an unknown key is refused here
                raise RunFileError(f"{where} has an unknown field {key!r} (written by a newer vaelib?); this vaelib "
                                   f"builds models from {', '.join(kind)}")
        return
    if isinstance(kind, tuple):
        if not any(value == c and type(value) is type(c) for c in kind):
            raise RunFileError(f"{where} is {_shown(value)}, not one of {', '.join(map(repr, kind))}")
        return
    optional = kind.endswith("?")
    if optional and value is None:
        return
    ok, what = _KINDS[kind.rstrip("?")]
    if not ok(value):
        raise RunFileError(f"{where} is {_shown(value)}, not {what}{' or null' if optional else ''}")


def _shown(value) -> str:
    text = repr(value) if not isinstance(value, Tensor) else f"a tensor of shape {tuple(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(obj, schema: dict, name: str) -> None:
    """Check a checkpoint's or run.json's fields against ``schema`` (CHECKPOINT_SCHEMA, RUN_JSON_SCHEMA): the one
    check of what vaelib reads back, so that a damaged, hand-edited or hostile file is one line naming the file and
    the field (a :class:`RunFileError`). Fields it does not list are left alone (a later format may add some; fit's
    run_info is the caller's dict), except in model_config: what build_vae would be given, where a newer vaelib's
    field would change the model. Non-finite weights and history values are refused too."""
    if not isinstance(obj, dict):
        raise RunFileError(f"{name} holds {_shown(obj)}, not an object")
    for key, kind in schema.items():
        if key in obj:
            _check_value(obj[key], kind, f"{name}: {key}")
    for key, tensor in (obj.get("model_state") or {}).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RunFileError(f"{name}: model_state.{key} holds NaN or infinite values (a diverged model: start "
                               "afresh, e.g. with --overwrite)")
    for row in obj.get("history") or []:
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise RunFileError(f"{name}: history epoch {row.get('epoch')!r} has {', '.join(bad)} NaN or infinite "
                               "(a diverged epoch: start afresh, e.g. with --overwrite)")


# ------------------------------------------------------------------------------------------------ files
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write through ``write(file_object)`` into a temp file in the same folder, fsync, then os.replace.

    A crash (or Ctrl-C) at any moment leaves either the old file or the new one, never a torn one. The file gets
    the mode a plain ``open`` would give (0666 less the umask), not the temp file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as err:
                if err.filename is None:  # a write on a file object names no file: name the one being written
                    raise OSError(err.errno, err.strerror or os.strerror(err.errno or 0), str(path)) from err
                raise
            with contextlib.suppress(OSError, AttributeError):  # no fchmod on Windows
                os.fchmod(fh.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temp files a killed writer left (call with the run lock held: no writer is mid-write)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for path in run_dir.iterdir():
            if _TEMP_FILE.match(path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def write_json(path: Path, obj) -> None:
    """Strict JSON (NaN and infinity are refused, not written as the non-JSON ``NaN``), written atomically."""
    text = json.dumps(obj, indent=1, allow_nan=False)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_history(run_dir: Path, history: list[dict]) -> None:
    write_json(run_dir / HISTORY_JSON, history)
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]

    def write_csv(fh) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        fh.write(text.getvalue().encode())

    atomic_write(run_dir / HISTORY_CSV, write_csv)


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    # Serialised in memory first: torch.save into a full disk reports "unexpected pos"; a plain write says ENOSPC.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """Load a checkpoint written by :func:`~vaelib.training.fit`.

    ``weights_only=True``: tensors and plain containers only, so a crafted file cannot run code. Anything that is not
    such a checkpoint raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise RunNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a refused pickle ("please file an issue"): one line here
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as err:  # torch's messages for these suggest weights_only=False: exactly what must not happen
        raise CheckpointError(f"checkpoint {path} is corrupt or not a vaelib checkpoint ({type(err).__name__}); "
                              "it was not loaded") from None
    missing = [k for k in ("format", "epoch", "model_state", "history") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a vaelib checkpoint (no {', '.join(missing)})")
    if not (_is_int(ckpt["format"]) and ckpt["format"] in _READABLE_FORMATS):
        raise CheckpointError(f"checkpoint {path} has format {_shown(ckpt['format'])}; this vaelib reads "
                              f"{', '.join(map(str, _READABLE_FORMATS))}")
    check_fields(ckpt, CHECKPOINT_SCHEMA, f"checkpoint {path}")
    return ckpt


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is corrupt ({err})") from None


def read_run_json(path: Path) -> dict:
    """run.json, checked (:func:`check_fields`); {} when there is none (a run of an older vaelib, or removed)."""
    if not path.is_file():
        return {}
    run = read_json(path)
    check_fields(run, RUN_JSON_SCHEMA, str(path))
    return run


# ------------------------------------------------------------------------------------------------ the lock
def _holder_pid(lock_path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(lock_path.read_text().split()[0])
    return None


class RunLock:
    """The run lock (a ``filelock`` on ``<run_dir>/.lock``), held while a process writes the run; the holder's PID
    is written into the lock file so that a second process can name it. Not reentrant across instances."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._lock = FileLock(str(self.path))

    def __enter__(self) -> RunLock:
        if self.path.is_symlink():  # not a lock vaelib made; writing through it would write its target
            raise RunError(f"{self.path} is a symbolic link, not vaelib's run lock; remove it (no vaelib process "
                           "holds it) and try again")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            pid = _holder_pid(self.path)
            who = f"process {pid}" if pid is not None else "another process"
            raise RunLockedError(f"run {self.run_dir} is in use by {who} (vaelib train or eval); wait for it to "
                                 "finish or stop it", pid) from None
        try:
            with open(self.path, "w") as fh:  # we hold the lock: the content is ours to write
                fh.write(f"{os.getpid()}\n")
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


# ------------------------------------------------------------------------------------------------ what defines a run
def data_fingerprint(x: Tensor) -> str:
    """A cheap fingerprint of training data: shape, dtype and a hash of at most 2^16 evenly strided values."""
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step].to("cpu", torch.float64).contiguous().numpy().tobytes()
    described = f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    return f"{described} sha256:{hashlib.sha256(described.encode() + sample).hexdigest()[:16]}"


def check_resumable(ckpt: dict, config: dict, settings: dict) -> None:
    """Refuse to resume unless the model and every setting that defines the run (all but CHANGEABLE_ON_RESUME)
    equal the checkpoint's; the error lists each difference. ``settings`` is the run's record
    (:meth:`vaelib.settings.TrainSettings.recorded`, what run.json holds); a key absent from either side is not
    compared (a checkpoint of format 1 holds fewer)."""
    differences: list[tuple[str, object, object]] = []
    saved_config = ckpt.get("model_config") or {}
    if config and saved_config:
        keys = sorted(set(saved_config) | set(config))
        differences += [(f"model {k}", saved_config.get(k), config.get(k)) for k in keys
                        if saved_config.get(k) != config.get(k)]
    saved = ckpt.get("settings", {})
    done, wanted = int(ckpt["epoch"]), settings.get("epochs")
    if isinstance(wanted, int) and wanted < done:  # run.json would then disagree with the checkpoint
        raise RunMismatchError(f"cannot resume: the run has trained {done} epochs already, more than epochs={wanted} "
                               f"(give at least {done}; {done} trains nothing more)", [("epochs", done, wanted)])
    if lr_lowered(saved, settings):
        lr_final = settings.get("lr_final")
        if lr_final is not None and settings["lr"] < lr_final:
            raise RunMismatchError(f"cannot resume with lr {settings['lr']:g}: below the run's lr_final "
                                   f"{lr_final:g}, the schedule would rise", [("lr", saved["lr"], settings["lr"])])
        saved = {k: v for k, v in saved.items() if k != "lr"}
    differences += [(k, saved[k], settings.get(k)) for k in saved
                    if k not in CHANGEABLE_ON_RESUME and k in settings and saved[k] != settings[k]]
    if differences:
        raise RunMismatchError(
            "cannot resume: the run was made with other settings: " + "; ".join(
                f"{name} is {now!r} now but {then!r} in the run" for name, then, now in differences)
            + f" (only {', '.join(CHANGEABLE_ON_RESUME)} may change on resume, and lr may be lowered)", differences)


def lr_lowered(saved: dict, settings: dict) -> bool:
    """Whether resuming lowers vaelib's Adam's lr (allowed: what a user tries after a divergence)."""
    lr, old = settings.get("lr"), saved.get("lr")
    return (saved.get("optimizer", "adam") == "adam" == settings.get("optimizer", "adam")
            and isinstance(lr, float | int) and isinstance(old, float | int) and 0 < lr < old)


# ------------------------------------------------------------------------------------------------ a run being written
class RunDirectory:
    """The run directory ``fit`` writes, held (locked) from ``__enter__`` to ``__exit__``. With ``path=None`` every
    method does nothing, so that ``fit``'s loop reads the same with and without a run directory.

    ``end_of_epoch`` writes the checkpoint when it is due and otherwise keeps the epoch's state pending;
    ``flush`` writes a pending state (on Ctrl-C, SIGTERM or divergence), so no finished epoch is lost.
    """

    def __init__(self, path: str | os.PathLike | None, resume: bool = False, overwrite: bool = False):
        self.path = Path(path) if path is not None else None
        self.checkpoint = self.path / CHECKPOINT_NAME if self.path is not None else None
        self.resume, self.overwrite = resume, overwrite
        self.saved_epoch = 0
        self._pending: dict | None = None
        self._replacing = False
        self._lock: RunLock | None = None
        self._history: list[dict] | None = None

    def __enter__(self) -> RunDirectory:
        if self.path is not None:
            if self.resume and not self.path.is_dir():
                raise RunNotFoundError(f"run directory {self.path} does not exist (nothing to resume)")
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.path).__enter__()
            try:
                remove_stale_temp_files(self.path)
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.__exit__(*exc)
            self._lock = None

    def open(self) -> dict | None:
        """The checkpoint to resume from, or None for a new run (after checking that no run is overwritten
        unasked)."""
        if self.path is None:
            return None
        if self.resume:
            ckpt = load_checkpoint(self.checkpoint)
            self.saved_epoch = int(ckpt["epoch"])
            return ckpt
        held = [n for n in _RUN_FILES if (self.path / n).exists()]
        if held and not self.overwrite:
            raise RunExistsError(f"{self.path} already holds a run ({', '.join(held)}); continue it with --resume "
                                 "(resume=True) or replace it with --overwrite (overwrite=True)")
        self._replacing = bool(held)
        return None

    def begin(self, state: dict | None, run_json: dict, history: list[dict]) -> None:
        """Start writing: a new run's epoch-0 checkpoint first (an interrupt in epoch 1 resumes from it), then
        run.json; only then does a replaced run lose its other files. ``history`` is fit's list of rows (the
        checkpoint's, when resuming: the history files are rewritten to match it)."""
        self._history = history
        if self.path is None:
            return
        if state is not None:
            save_checkpoint(state, self.checkpoint)
        write_json(self.path / RUN_JSON, run_json)
        if self._replacing:
            for name in (HISTORY_JSON, HISTORY_CSV, EVAL_JSON):
                (self.path / name).unlink(missing_ok=True)
            self._replacing = False
        if history:  # after a SIGKILL the history files may list epochs the checkpoint lost
            write_history(self.path, history)

    def write_run_json(self, run_json: dict) -> None:
        if self.path is not None:
            write_json(self.path / RUN_JSON, run_json)

    def _save(self, state: dict) -> None:
        """Write ``state`` as the checkpoint; eval.json evaluated the one it replaces, so it goes (a stale result
        would be read as this epoch's). A failed write names the file and the epoch the checkpoint still holds."""
        try:
            save_checkpoint(state, self.checkpoint)
        except OSError as err:
            if self._history is not None:  # the history files should list what the checkpoint holds, if they can
                with contextlib.suppress(OSError):
                    write_history(self.path, [row for row in self._history if row["epoch"] <= self.saved_epoch])
            raise RunWriteError(f"cannot write {err.filename or self.checkpoint}: {_os_reason(err)}; the checkpoint "
                                f"{self.checkpoint} still holds epoch {self.saved_epoch} (resume from it once the "
                                "fault is mended)", err) from err
        (self.path / EVAL_JSON).unlink(missing_ok=True)

    def _write_history(self, rows: list[dict]) -> None:
        try:
            write_history(self.path, rows)
        except OSError as err:
            raise RunWriteError(f"cannot write {err.filename or self.path / HISTORY_JSON}: {_os_reason(err)}; the "
                                f"checkpoint {self.checkpoint} holds epoch {self.saved_epoch}", err) from err

    def end_of_epoch(self, state, due: bool) -> None:
        """After an epoch (its row appended to the history): ``state()`` gives its checkpoint state, written now if
        ``due``, else kept (cloned) as pending; the history files list it either way."""
        if self.path is None:
            return
        if due:
            self._save(state())
            self.saved_epoch, self._pending = int(self._history[-1]["epoch"]), None
        else:
            self._pending = clone_tree(state())
        self._write_history(self._history)

    def flush(self) -> int:
        """Write the pending epoch, if any, and history files that match the checkpoint (an interrupt may have come
        between the two); the epoch the checkpoint now holds."""
        if self.path is None:
            return self.saved_epoch
        if self._pending is not None:
            self._save(self._pending)
            self.saved_epoch, self._pending = int(self._pending["epoch"]), None
        if self._history is not None:
            rows = [row for row in self._history if row["epoch"] <= self.saved_epoch]
            if rows:
                self._write_history(rows)
            else:
                for name in (HISTORY_JSON, HISTORY_CSV):
                    (self.path / name).unlink(missing_ok=True)
        return self.saved_epoch

    def where(self) -> str:
        return (f"{self.checkpoint} (end of epoch {self.saved_epoch})" if self.checkpoint is not None
                else "none written (no out_dir)")


def _os_reason(err: OSError) -> str:
    return {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}.get(
        err.errno, err.strerror or str(err))


def clone_tree(obj):
    """Deep copy of nested dicts/lists with tensors cloned (a snapshot that later steps cannot change)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------------------------ reading a run
def load_run(run_dir: str | os.PathLike, model: nn.Module | None = None,
             device: str | torch.device | None = "cpu") -> LoadedRun:
    """The model (rebuilt from the stored config unless given), history and settings of a run directory."""
    from vaelib.config import select_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunNotFoundError(f"run directory {run_dir} does not exist")
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    config = ckpt.get("model_config") or {}
    if model is None:
        if not config:
            raise RunError(f"{run_dir}: the checkpoint holds no model config (a custom model); pass model=")
        from vaelib.models import build_vae

        model = build_vae(**config)
    try:
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {run_dir / CHECKPOINT_NAME} does not fit the model "
                              f"({' '.join(str(err).split())[:200]})") from None
    model.to(select_device(device)).eval()
    run = read_run_json(run_dir / RUN_JSON)
    return LoadedRun(model=model, history=list(ckpt["history"]), epoch=int(ckpt["epoch"]), config=config, run=run,
                     run_dir=run_dir, run_info=dict(ckpt.get("run_info") or run.get("run_info") or {}))


__all__ = [
    "CHANGEABLE_ON_RESUME", "CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "EVAL_JSON", "HISTORY_CSV", "HISTORY_JSON",
    "LOCK_NAME", "RUN_JSON", "CheckpointError", "LoadedRun", "RunDirectory", "RunError", "RunExistsError",
    "RunFileError", "RunLock", "RunLockedError", "RunMismatchError", "RunNotFoundError", "RunWriteError",
    "atomic_write", "check_fields", "check_resumable", "data_fingerprint", "load_checkpoint", "load_run",
    "read_run_json", "remove_stale_temp_files", "save_checkpoint",
]
