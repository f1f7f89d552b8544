"""Fault injection, done as a user would: bad options, wrong or damaged data, unreadable folders, interrupts.

Every fault must give one clear line (CLI: exit 2, 130 for Ctrl-C, 143 for SIGTERM) and lose nothing. The data
tests use tiny IDX files written here; to test the checksum logic without the real data sets, the published MD5
sums are replaced by those of two fake data sets. Probes that need the real Fashion-MNIST files skip without them.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from vaelib import cli, data
from vaelib.cli import main
from vaelib.data import (
    CorruptDataError,
    DataNote,
    DataNotFoundError,
    DataPermissionError,
    find_dataset,
    load_split,
)
from vaelib.errors import VaelibError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_real_data = pytest.mark.skipif(not (REAL_FASHION / "t10k-labels-idx1-ubyte.gz").is_file(),
                                     reason="Debian's Fashion-MNIST is not installed")
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "vaelib", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def fork_main(argv: list[str], logs: Path) -> int:
    """Run the CLI's main(argv) in a forked child (torch is already imported there: no seconds of start-up);
    its stdout/stderr go to ``logs``/out, ``logs``/err. Returns the child's PID."""
    import torch._dynamo  # noqa: F401 (Adam imports it: once here, not seconds in every child)

    logs.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70  # an exception escaped main
        try:
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(logs / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # the child exits below
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait_for(path: Path, timeout: float = 60) -> float:
    """Poll until ``path`` exists; the time it was seen."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)
    return time.monotonic()


def wait_exit_code(pid: int, timeout: float = 120) -> int:
    """The exit status of child ``pid`` (negative: killed by that signal)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def one_line(text: str) -> str:
    """The single line of ``text`` (fails if there are more, or a traceback)."""
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ------------------------------------------------------------------------------------------- fake data sets
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_files(seed: int, n: int = 6) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    images = {s: idx_bytes(rng.integers(0, 256, (n, 28, 28))) for s in STEMS if "images" in s}
    labels = {s: idx_bytes(rng.integers(0, 10, n)) for s in STEMS if "labels" in s}
    return {**images, **labels}


FAKE = {"mnist": fake_files(1), "fashion-mnist": fake_files(2)}


def write(folder: Path, files: dict[str, bytes], only=STEMS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in only:
        (folder / f"{stem}.gz").write_bytes(gzip.compress(files[stem]))
    return folder


@pytest.fixture
def fake_sums(monkeypatch, tmp_path):
    """The two known data sets are FAKE's; no real data, env var, cache or ./data is visible."""
    sums = {name: {s: hashlib.md5(raw).hexdigest() for s, raw in files.items()} for name, files in FAKE.items()}
    monkeypatch.setattr(data, "_MD5", sums)
    monkeypatch.setattr(data, "_KNOWN_FILES", {m: (n, s) for n, d in sums.items() for s, m in d.items()})
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    real = data.search_path
    monkeypatch.setattr(data, "search_path", lambda name, root=None: [
        p for p in real(name, root) if not str(p).startswith("/usr/share/datasets")])
    return tmp_path


# ------------------------------------------------------------------------------------------- data search
def test_explicit_root_lacking_a_file_names_it_and_does_not_fall_through(fake_sums):
    write(fake_sums / "data", FAKE["mnist"])  # a complete copy on the default path: must not be used silently
    write(fake_sums / "mine", FAKE["mnist"], only=STEMS[:3])
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        find_dataset("mnist", root=fake_sums / "mine")
    assert str(fake_sums / "mine") in str(info.value)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_split("mnist", "train", root=fake_sums / "mnits")  # a typo
    assert find_dataset("mnist") == Path("data")  # without a root the default path still works


def test_env_var_lacking_the_files_is_an_error(fake_sums, monkeypatch):
    write(fake_sums / "data", FAKE["mnist"])
    (fake_sums / "empty").mkdir()
    monkeypatch.setenv(data.DATA_ENV, str(fake_sums / "empty"))
    with pytest.raises(DataNotFoundError, match=r"\$VAELIB_DATA.*lacks train-images-idx3-ubyte"):
        find_dataset("mnist")


def test_folder_of_another_data_set_is_skipped_with_a_note(fake_sums):
    write(fake_sums / "cache" / "vaelib", FAKE["fashion-mnist"])  # earlier on the path, same file names
    write(fake_sums / "data" / "mnist", FAKE["mnist"])
    with pytest.warns(DataNote, match="holds fashion-mnist, not mnist"):
        split = load_split("mnist", "test", dtype="uint8")
    assert split.source == Path("data") / "mnist"  # the resolved folder, for run.json


def test_explicit_folder_of_another_data_set_says_so_without_delete_advice(fake_sums):
    write(fake_sums / "fm", FAKE["fashion-mnist"])
    with pytest.raises(DataNotFoundError, match="holds fashion-mnist, not mnist") as info:
        load_split("mnist", "train", root=fake_sums / "fm")
    assert "Delete it" not in str(info.value)


def test_delete_advice_only_for_a_file_that_matches_nothing(fake_sums):
    folder = write(fake_sums / "d", FAKE["mnist"])
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(FAKE["fashion-mnist"]["train-images-idx3-ubyte"]))
    with pytest.raises(CorruptDataError, match="this is fashion-mnist's train-images") as info:
        load_split("mnist", "train", root=folder)
    assert "Delete it" not in str(info.value)
    altered = bytearray(FAKE["mnist"]["train-images-idx3-ubyte"])
    altered[-1] ^= 1
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(altered)))
    with pytest.raises(CorruptDataError, match="Delete it"):
        load_split("mnist", "train", root=folder)


def test_damaged_deflate_stream_is_corrupt_data_naming_the_file(fake_sums):
    folder = write(fake_sums / "d", FAKE["mnist"])
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[10] = 0xFF  # the first deflate block header: BTYPE 11, which does not exist (zlib.error)
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte.gz.*corrupt"):
        load_split("mnist", "test", root=folder)
    path.write_bytes(gzip.compress(FAKE["mnist"]["t10k-images-idx3-ubyte"])[:-30])  # cut short: EOFError
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_split("mnist", "test", root=folder)


def test_permission_denied_is_reported_as_permission(fake_sums, monkeypatch):
    # The tests may run as root, for whom chmod does not bite: the OS's refusal is simulated.
    folder = write(fake_sums / "d", FAKE["mnist"])
    real_open = gzip.open

    def refuse(path, *args, **kwargs):
        if Path(path).name.startswith("t10k-images"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(gzip, "open", refuse)
    with pytest.raises(DataPermissionError, match="t10k-images-idx3-ubyte.gz: permission denied"):
        load_split("mnist", "test", root=folder)
    monkeypatch.setattr(gzip, "open", real_open)

    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self.parent == folder:  # the folder lets nobody in
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(DataPermissionError, match="permission denied"):
        find_dataset("mnist", root=folder)


def test_every_data_error_is_a_vaelib_error():
    for cls in (data.DataError, data.UnknownDatasetError, DataNotFoundError, CorruptDataError, DataPermissionError):
        assert issubclass(cls, VaelibError)


# ------------------------------------------------------------------------------------------- CLI arguments
@pytest.mark.parametrize("option, value", [
    ("--seed", "abc"), ("--seed", "-1"), ("--seed", str(2**64)), ("--epochs", "1.5"), ("--batch-size", "0"),
    ("--beta", "nan"), ("--beta", "-1"), ("--beta", "inf"), ("--sigma", "inf"), ("--sigma", "nan"),
    ("--lr", "nan"), ("--lr", "inf"), ("--lr-final", "inf"), ("--warmup-epochs", "x"),
])
def test_bad_option_is_refused_up_front_naming_the_option(option, value, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:  # (an empty data root: if the option passed, no training would start)
        main(["train", "--out", str(tmp_path / "run"), "--data-root", str(tmp_path), option, value])
    assert info.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert f"argument {option}: expected" in line and "_" not in line.split("(see")[0], line
    assert not (tmp_path / "run").exists()


def test_eval_seed_names_the_option(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--seed", "x"])
    assert "argument --seed: expected a non-negative integer" in one_line(capsys.readouterr().err)


def test_out_that_is_a_file_is_one_line_and_the_file_survives(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    proc = run_cli("train", "--out", str(out), "--data-root", str(tmp_path), "--epochs", "0", "--no-progress",
                   "--device", "cpu")
    assert proc.returncode == 2
    assert "is not a directory" in one_line(proc.stderr)
    assert out.read_text() == "keep me"


def test_os_errors_are_named_in_one_line(monkeypatch, capsys, tmp_path):
    faults = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
              errno.ENOTDIR: "not a directory", errno.EROFS: "read-only file system"}
    for code, words in faults.items():
        def command(args, code=code):
            raise OSError(code, os.strerror(code), str(tmp_path / "checkpoint.pt"))

        monkeypatch.setattr(cli, "cmd_data", command)
        assert main(["data", "mnist"]) == 2
        line = one_line(capsys.readouterr().err)
        assert line == f"vaelib data: error: {words}: {tmp_path / 'checkpoint.pt'}"


def test_debug_adds_the_traceback(monkeypatch, capsys, tmp_path):
    def command(args):
        raise DataNotFoundError("mnist data not found here")

    monkeypatch.setattr(cli, "cmd_data", command)
    assert main(["data", "mnist", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "vaelib data: error: mnist data not found here"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_while_loading_data_is_one_line(signum, code, monkeypatch, tmp_path):
    def slow_load(*args, **kwargs):
        if signum == signal.SIGINT:  # as in a terminal: a shell's background job starts with SIGINT ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the signal arrives in here
        raise AssertionError("the signal did not interrupt")

    monkeypatch.setattr(data, "load_split", slow_load)  # inherited by the child
    pid = fork_main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"], tmp_path / "log")
    assert wait_exit_code(pid) == code
    assert "interrupted" in one_line((tmp_path / "log" / "err").read_text())


def test_sigterm_handler_is_the_clis_only_while_it_runs(capsys, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["data", "mnist", "--root", str(tmp_path)]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_eval_checks_it_can_write_before_computing(tmp_path, monkeypatch, capsys):
    import tempfile

    import torch

    from vaelib import evaluation
    from vaelib.models import build_vae
    from vaelib.training import fit

    torch.manual_seed(0)
    out = tmp_path / "run"
    fit(build_vae(latent_dim=2, hidden=(8,)), torch.rand(16, 784), epochs=0, out_dir=out, progress=False,
        device="cpu", run_info={"dataset": "mnist"})
    computed = []
    monkeypatch.setattr(evaluation, "evaluate_elbo", lambda *a, **k: computed.append(1))
    monkeypatch.setattr(data, "load_split", lambda *a, **k: computed.append(1))

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(dir) / ".vaelib-write-test.x"))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert main(["eval", str(out), "--device", "cpu"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "read-only file system" in line and str(out) in line
    assert computed == [] and not (out / "eval.json").exists()


def test_mistyped_data_root_is_an_error_not_a_fall_through(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--data-root", str(tmp_path / "fashoin"),
                 "--epochs", "0", "--no-progress", "--device", "cpu"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "does not exist" in line and str(tmp_path / "fashoin") in line
    assert not (tmp_path / "run").exists()


@needs_real_data
def test_env_var_pointing_at_the_other_data_set_says_so(monkeypatch, capsys):
    monkeypatch.setenv(data.DATA_ENV, str(REAL_FASHION))
    assert main(["data", "mnist"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "holds fashion-mnist, not mnist" in line and "Delete it" not in line


def test_run_json_records_the_resolved_data_folder(fake_sums, capsys):
    write(fake_sums / "d" / "MNIST" / "raw", FAKE["mnist"])  # torchvision's layout under the root given
    out = fake_sums / "run"
    assert main(["train", "--dataset", "mnist", "--out", str(out), "--data-root", str(fake_sums / "d"),
                 "--epochs", "0", "--test-size", "0", "--no-progress", "--device", "cpu"]) == 0
    info = json.loads((out / "run.json").read_text())["run_info"]
    assert info["data_root"] == str(fake_sums / "d") and info["data_path"] == str(fake_sums / "d" / "MNIST" / "raw")


# ------------------------------------------------------------------------------------------- runs: kill, resume
N_TRAIN, EPOCHS = 192, 6


@pytest.fixture
def fake_mnist(fake_sums):
    """A tiny 'mnist' (192 training, 192 test images) that passes the checksums; the root folder it is in."""
    files = fake_files(3, n=N_TRAIN)
    sums = {s: hashlib.md5(raw).hexdigest() for s, raw in files.items()}
    data._MD5["mnist"] = sums  # (fake_sums' monkeypatch restores the whole table)
    data._KNOWN_FILES.update({m: ("mnist", s) for s, m in sums.items()})
    return write(fake_sums / "mnist-data", files)


def train_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "mnist", "--data-root", str(root), "--out", str(out), "--latent", "2",
            "--hidden", "16", "--batch-size", "32", "--epochs", str(EPOCHS), "--test-size", "32",
            "--checkpoint-every", "2", "--binarize", "dynamic", "--seed", "3", "--no-progress", "--device", "cpu",
            *extra]


def resume_argv(out: Path) -> list[str]:
    # Only what a user types: the data set, model and settings come from the run.
    return ["train", "--out", str(out), "--resume", "--no-progress", "--device", "cpu"]


def final_state(out: Path):
    import torch

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in ckpt["history"]]
    return ckpt["epoch"], ckpt["model_state"], history


def assert_same_run(a: Path, b: Path) -> None:
    import torch

    epoch_a, state_a, hist_a = final_state(a)
    epoch_b, state_b, hist_b = final_state(b)
    assert epoch_a == epoch_b == EPOCHS and hist_a == hist_b
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_killed_at_random_points_then_resumed_equals_an_uninterrupted_run(fake_mnist, tmp_path, monkeypatch):
    """SIGINT, SIGTERM and SIGKILL at seeded random moments; then `--resume` until done: bit for bit the same."""
    import random

    import torch

    real_load = data.load_split

    def load_split(*args, **kwargs):  # (in the children) tells the test that data loading has begun
        (tmp_path / f"loading-{os.getpid()}").touch()
        return real_load(*args, **kwargs)

    monkeypatch.setattr(data, "load_split", load_split)

    reference = tmp_path / "reference"
    pid = fork_main(train_argv(fake_mnist, reference), tmp_path / "log-ref")
    started = wait_for(reference / "checkpoint.pt")  # the epoch-0 checkpoint: training starts
    assert wait_exit_code(pid) == 0
    training_seconds = time.monotonic() - started
    rng = random.Random(14)
    expected_code = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}
    for trial, signum in enumerate([signal.SIGINT, signal.SIGTERM, signal.SIGKILL] * 2):
        out, logs = tmp_path / f"run{trial}", tmp_path / f"log{trial}"
        pid = fork_main(train_argv(fake_mnist, out), logs)
        if trial == 0:  # the first trial: during data loading; the others: at a random moment of training
            wait_for(tmp_path / f"loading-{pid}")
        else:
            wait_for(out / "checkpoint.pt")
            time.sleep(rng.uniform(0.0, 0.8) * training_seconds)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        code = wait_exit_code(pid)
        assert code in (0, expected_code[signum]), (trial, code, (logs / "err").read_text())
        if code in (130, 143):
            err = one_line((logs / "err").read_text())
            assert "interrupted" in err
            if (out / "history.json").exists():  # nothing finished is lost: pending epochs were saved
                saved = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
                assert saved == len(json.loads((out / "history.json").read_text())), err
        resumed = resume_argv(out) if (out / "checkpoint.pt").exists() else train_argv(fake_mnist, out)
        assert wait_exit_code(fork_main(resumed, logs)) == 0, (logs / "err").read_text()
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # a SIGKILL's temp file is gone
        assert_same_run(reference, out)


def test_sigterm_saves_the_pending_epochs(fake_mnist, tmp_path, monkeypatch):
    from vaelib import training

    real, calls = training.train_epoch, []

    def epoch_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # epochs 1-3 are done; with --checkpoint-every 2 epoch 3 was not written yet
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", epoch_then_sigterm)  # in the forked child
    out = tmp_path / "run"
    assert wait_exit_code(fork_main(train_argv(fake_mnist, out), tmp_path / "log")) == 143
    assert "interrupted by SIGTERM" in one_line((tmp_path / "log" / "err").read_text())
    assert final_state(out)[0] == 3


def test_interrupt_between_checkpoint_and_history_leaves_them_matching(tmp_path, monkeypatch):
    import torch

    from vaelib import runs
    from vaelib.models import build_vae
    from vaelib.training import TrainingInterrupted, fit

    real, calls = runs.write_history, []

    def interrupted_once(run_dir, history):
        calls.append(len(history))
        if len(history) == 2 and calls.count(2) == 1:  # epoch 2's checkpoint is written, its history not yet
            raise KeyboardInterrupt
        real(run_dir, history)

    monkeypatch.setattr(runs, "write_history", interrupted_once)
    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted):
        fit(build_vae(latent_dim=2, hidden=(8,)), torch.rand(64, 784), epochs=4, batch_size=32, checkpoint_every=2,
            out_dir=tmp_path, progress=False, device="cpu")
    assert final_state(tmp_path)[0] == 2 == len(json.loads((tmp_path / "history.json").read_text()))


def test_divergence_saves_the_last_good_epoch(tmp_path, monkeypatch):
    import torch

    from vaelib import training
    from vaelib.models import build_vae
    from vaelib.training import TrainingDivergedError, fit

    real, calls = training.train_epoch, []

    def nan_in_epoch_3(*args, **kwargs):
        calls.append(1)
        acc, bad = real(*args, **kwargs)
        return (acc, torch.zeros_like(bad)) if len(calls) == 3 else (acc, bad)  # step 1's loss "was NaN"

    monkeypatch.setattr(training, "train_epoch", nan_in_epoch_3)
    torch.manual_seed(0)
    with pytest.raises(TrainingDivergedError, match="end of epoch 2"):
        fit(build_vae(latent_dim=2, hidden=(8,)), torch.rand(64, 784), epochs=6, batch_size=32, checkpoint_every=5,
            out_dir=tmp_path, progress=False, device="cpu")
    assert final_state(tmp_path)[0] == 2


# ------------------------------------------------------------------------------------------- runs: never lost
def test_train_into_an_existing_run_refuses_and_overwrite_replaces(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0
    (out / "eval.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(train_argv(fake_mnist, out, "--epochs", "1", "--lr", "0.01")) == 2
    line = one_line(capsys.readouterr().err)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(train_argv(fake_mnist, out, "--epochs", "1", "--lr", "0.01", "--overwrite")) == 0
    assert not (out / "eval.json").exists()
    assert json.loads((out / "run.json").read_text())["settings"]["lr"] == 0.01


def test_overwrite_keeps_the_old_run_until_the_new_checkpoint_is_written(tmp_path, monkeypatch):
    import torch

    from vaelib import runs
    from vaelib.models import build_vae
    from vaelib.training import fit

    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(0))
    fit(build_vae(latent_dim=2, hidden=(8,)), x, epochs=1, out_dir=tmp_path, progress=False, device="cpu")
    (tmp_path / "eval.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(state, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(runs, "save_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space"):
        fit(build_vae(latent_dim=2, hidden=(8,)), x, epochs=1, out_dir=tmp_path, overwrite=True, progress=False,
            device="cpu")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("option, value", [("--lr", "1e6"), ("--binarize", "threshold"), ("--seed", "5"),
                                           ("--latent", "3"), ("--dataset", "fashion-mnist")])
def test_resume_with_another_option_refuses_naming_it(option, value, fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*resume_argv(out), "--epochs", "2", option, value]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{option} " in line and "cannot resume" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_with_other_data_of_the_same_size_refuses(tmp_path):
    import torch

    from vaelib.models import build_vae
    from vaelib.runs import RunMismatchError
    from vaelib.training import fit

    g = torch.Generator().manual_seed(0)
    x, other = torch.rand(64, 784, generator=g), torch.rand(64, 784, generator=g)
    fit(build_vae(latent_dim=2, hidden=(8,)), x, epochs=1, out_dir=tmp_path, progress=False, device="cpu")
    with pytest.raises(RunMismatchError, match="data"):
        fit(build_vae(latent_dim=2, hidden=(8,)), other, epochs=2, out_dir=tmp_path, resume=True, progress=False,
            device="cpu")
    fit(build_vae(latent_dim=2, hidden=(8,)), x, epochs=2, out_dir=tmp_path, resume=True, progress=False,
        device="cpu")  # the same data: fine, and --epochs may change


def test_a_second_writer_gets_one_line_naming_the_holder(fake_mnist, tmp_path, monkeypatch, capsys):
    from vaelib import training

    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0
    real = training.train_epoch

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", slow)
    holder = fork_main([*resume_argv(out), "--epochs", "40"], tmp_path / "log")  # a first writer, for ~20 s
    monkeypatch.setattr(training, "train_epoch", real)
    try:
        deadline = time.monotonic() + 60
        while (out / ".lock").read_text().strip() != str(holder):
            assert time.monotonic() < deadline, "the first writer never took the lock"
            time.sleep(0.05)
        for argv in ([*resume_argv(out), "--epochs", "3"], train_argv(fake_mnist, out, "--overwrite"),
                     ["eval", str(out), "--device", "cpu"]):
            assert main(argv) == 2
            line = one_line(capsys.readouterr().err)
            assert f"in use by process {holder}" in line, line
    finally:
        os.kill(holder, signal.SIGTERM)
        assert wait_exit_code(holder) == 143
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["epochs"] == 40 and "--epochs 40" in run["run_info"]["command"]  # the holder's, alone


# ------------------------------------------------------------------------------------------- runs: bad checkpoints
def _tiny_run(path: Path) -> Path:
    import torch

    from vaelib.models import build_vae
    from vaelib.training import fit

    torch.manual_seed(0)
    fit(build_vae(latent_dim=2, hidden=(8,)), torch.rand(32, 784), epochs=1, out_dir=path, progress=False,
        device="cpu", run_info={"dataset": "mnist"})
    return path / "checkpoint.pt"


class Payload:
    """A pickle that would touch ``marker`` when loaded: a checkpoint must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign", "malicious"])
def test_bad_checkpoint_is_one_line_and_runs_nothing(damage, tmp_path, capsys):
    import torch

    ckpt = _tiny_run(tmp_path / "run")
    raw = ckpt.read_bytes()
    marker = tmp_path / "payload-ran"
    if damage == "truncated":
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(os.urandom(len(raw)))
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"state_dict": {}}, ckpt)
    else:
        torch.save({"format": 2, "epoch": 1, "model_state": Payload(marker), "history": []}, ckpt)
    for argv in (["eval", str(tmp_path / "run"), "--device", "cpu"],
                 ["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress", "--device", "cpu"]):
        assert main(argv) == 2
        line = one_line(capsys.readouterr().err)
        assert "is corrupt or not a vaelib checkpoint" in line and "weights_only" not in line, line
    assert not marker.exists()


def test_stale_temp_files_go_and_files_get_the_umask_mode(tmp_path):
    import stat as st

    old = os.umask(0o027)
    try:
        ckpt = _tiny_run(tmp_path / "run")
        stale = tmp_path / "run" / ".checkpoint.pt.k1ll3d.tmp"
        stale.write_bytes(b"x" * 1000)
        keep = tmp_path / "run" / "notes.tmp"  # not ours: stays
        keep.write_text("mine")
        import torch

        from vaelib.models import build_vae
        from vaelib.training import fit

        torch.manual_seed(0)
        fit(build_vae(latent_dim=2, hidden=(8,)), torch.rand(32, 784), epochs=2, out_dir=tmp_path / "run",
            resume=True, progress=False, device="cpu")
    finally:
        os.umask(old)
    assert not stale.exists() and keep.exists()
    for name in ("checkpoint.pt", "history.json", "history.csv", "run.json"):
        assert st.S_IMODE((ckpt.parent / name).stat().st_mode) == 0o640, name


def test_full_disk_is_named_not_torch_unexpected_pos(tmp_path, monkeypatch):
    import io

    import torch

    from vaelib import runs

    class FullDisk(io.RawIOBase):
        def __init__(self):
            self.written = 0

        def writable(self):
            return True

        def write(self, b):
            self.written += len(b)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return len(b)

    monkeypatch.setattr(runs, "atomic_write", lambda path, write: write(FullDisk()))
    with pytest.raises(OSError) as info:
        runs.save_checkpoint({"w": torch.zeros(10_000)}, tmp_path / "checkpoint.pt")
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize("bad", ["nan", "empty"])
def test_evaluation_refuses_nan_and_empty_input(bad):
    import torch

    from vaelib.errors import InvalidInputError
    from vaelib.evaluation import evaluate_elbo, iwae_nll
    from vaelib.models import build_vae

    model = build_vae(latent_dim=2, hidden=(8,))
    x = torch.rand(4, 784)
    if bad == "nan":
        x[2, 5] = float("nan")
    else:
        x = x[:0]
    for evaluate in (evaluate_elbo, lambda m, v: iwae_nll(m, v, k=4)):
        with pytest.raises(InvalidInputError, match="NaN" if bad == "nan" else "empty"):
            evaluate(model, x)


# ------------------------------------------------------------------------------------------- issue 19's probes
def strict_json(path: Path):
    """``path`` read as strict JSON (NaN and Infinity, which json.dumps writes by default, are refused)."""
    def refuse(word):
        raise AssertionError(f"{path} holds {word}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def all_finite(state: dict) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_divergence_in_an_epochs_last_step_is_not_saved_and_a_smaller_lr_resumes(fake_mnist, tmp_path, capsys):
    """lr 1e30, one step per epoch: every step's loss is finite (it is computed before the update), but the update
    leaves weights of ~1e30 whose test ELBO is NaN. That epoch diverged: nothing of it may be saved."""
    import torch

    out = tmp_path / "run"
    argv = train_argv(fake_mnist, out, "--lr", "1e30", "--batch-size", str(N_TRAIN), "--checkpoint-every", "1")
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert "diverged" in line and "epoch 1" in line and "end of epoch 0" in line and "--resume --lr" in line, line
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and all_finite(ckpt["model_state"])
    assert not (out / "history.json").exists()
    # What a user tries first: the same run, a smaller step. Allowed, and said so in --help.
    assert main([*resume_argv(out), "--lr", "1e-3", "--epochs", "2"]) == 0
    history = strict_json(out / "history.json")
    assert [row["lr"] for row in history] == [1e-3, 1e-3]
    assert strict_json(out / "run.json")["settings"]["lr"] == 1e-3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--lr may be lowered" in " ".join(capsys.readouterr().out.split())
    assert main([*resume_argv(out), "--lr", "1e-2", "--epochs", "3"]) == 2  # raising it is still refused
    assert "--lr 0.01 is not the run's 0.001" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("where", ["the parameters", "the optimizer's moments"])
def test_non_finite_parameters_after_an_epoch_are_its_divergence(where, tmp_path, monkeypatch):
    """Without a test set, the parameters and Adam's moments are what an epoch's last update left."""
    import torch

    from vaelib import training
    from vaelib.models import build_vae
    from vaelib.training import TrainingDivergedError, fit

    real, calls = training.train_epoch, []

    def inf_weight_in_epoch_3(step, opt, *args, **kwargs):
        calls.append(1)
        acc, bad = real(step, opt, *args, **kwargs)  # every loss finite
        if len(calls) == 3:  # as an overflowing update would
            weight = opt.param_groups[0]["params"][0]
            with torch.no_grad():
                (weight if where == "the parameters" else opt.state[weight]["exp_avg_sq"])[0, 0] = float("inf")
        return acc, bad

    monkeypatch.setattr(training, "train_epoch", inf_weight_in_epoch_3)
    torch.manual_seed(0)
    with pytest.raises(TrainingDivergedError, match=f"epoch 3 left {where} NaN or infinite.*end of epoch 2"):
        fit(build_vae(latent_dim=2, hidden=(8,)), torch.rand(64, 784), epochs=4, batch_size=32, out_dir=tmp_path,
            progress=False, device="cpu")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and all_finite(ckpt["model_state"])
    assert [row["epoch"] for row in strict_json(tmp_path / "history.json")] == [1, 2]


@pytest.mark.parametrize("weights", ["huge", "nan"])
def test_eval_refuses_nan_as_a_result(weights, fake_mnist, tmp_path, capsys):
    """A model whose weights are ~1e30 (what older versions saved after a divergence) or NaN."""
    import torch

    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["model_state"] = {k: v * 1e30 if weights == "huge" else v * float("nan") for k, v in
                           ckpt["model_state"].items()}
    torch.save(ckpt, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["eval", str(out), "--iwae-k", "0", "--device", "cpu"]) == 2
    line = one_line(capsys.readouterr().err)
    assert ("NaN or infinite test_elbo" if weights == "huge" else "model_state") in line, line
    assert not (out / "eval.json").exists()


def test_strict_json_is_written(tmp_path):
    from vaelib.runs import write_json

    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"test_elbo": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_out_of_memory_building_the_model_names_the_option(fake_mnist, tmp_path, capsys):
    # 400 x 1e11 weights: the allocator refuses at once (no memory is touched).
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--latent", "100000000000")) == 2
    assert "out of memory: --latent 100000000000" in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_out_of_memory_during_training_saves_a_resumable_checkpoint(fake_mnist, tmp_path, monkeypatch, capsys):
    from vaelib import training

    real, calls = training.train_epoch, []

    def oom_in_epoch_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # epochs 1-3 done, epoch 3 pending (--checkpoint-every 2)
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", oom_in_epoch_4)
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--objective", "iwae", "--k", "3")) == 2  # (the largest option)
    line = one_line(capsys.readouterr().err)
    assert "out of memory: --k 3 " in line and "resumable checkpoint (epoch 3)" in line, line
    assert "Resume with: python -m vaelib train" in line and line.endswith("--resume")
    assert final_state(out)[0] == 3 == len(strict_json(out / "history.json"))


def test_out_of_memory_in_eval_names_the_option(fake_mnist, tmp_path, monkeypatch, capsys):
    from vaelib import ais

    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0

    def oom(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ais, "ais_log_likelihood", oom)
    capsys.readouterr()
    assert main(["eval", str(out), "--iwae-k", "0", "--ais", "--ais-chains", "1000000000", "--device", "cpu"]) == 2
    assert "out of memory: --ais-chains 1000000000" in one_line(capsys.readouterr().err)
    assert not (out / "eval.json").exists()


@pytest.mark.parametrize("device", ["xpu", "hip", "vulkan", "mkldnn", "meta", "env:meta"])
def test_device_torch_cannot_use_is_one_line_and_makes_no_run(device, fake_mnist, tmp_path, monkeypatch, capsys):
    from vaelib.config import DEVICE_ENV

    out = tmp_path / "run"
    argv = [a for a in train_argv(fake_mnist, out, "--epochs", "1") if a not in ("--device", "cpu")]
    if device.startswith("env:"):
        monkeypatch.setenv(DEVICE_ENV, device[4:])
    else:
        argv += ["--device", device]
    assert main(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert f"device {device.removeprefix('env:')!r}" in line and "available: cpu" in line, line
    assert ("$VAELIB_DEVICE" in line) == device.startswith("env:")
    assert not out.exists()  # a plain re-run is not blocked by a half-made run
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert main([*argv[:-2], "--device", "cpu"] if not device.startswith("env:") else argv) == 0


RUN_JSON_FAULTS = {"null": (None, "holds None, not an object"), "a list": ([1, 2], "holds [1, 2], not an object"),
                   "run_info a string": ({"run_info": "x"}, "run_info is 'x', not an object"),
                   "binarize bogus": ({"run_info": {"binarize": "bogus"}}, "run_info.binarize is 'bogus'"),
                   "seed a string": ({"run_info": {"seed": "abc"}}, "run_info.seed is 'abc', not an integer"),
                   "dataset null": ({"run_info": {"dataset": None}}, "run_info.dataset is None, not a string"),
                   "data_root a number": ({"run_info": {"data_root": 5}}, "run_info.data_root is 5")}


@pytest.mark.parametrize("fault", RUN_JSON_FAULTS)
def test_damaged_run_json_is_one_line_naming_the_field(fault, fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0
    content, words = RUN_JSON_FAULTS[fault]
    (out / "run.json").write_text(json.dumps(content))
    capsys.readouterr()
    assert main(["eval", str(out), "--iwae-k", "0", "--device", "cpu"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(out / "run.json") in line and words in line, line
    from vaelib.runs import RunFileError, load_run

    with pytest.raises(RunFileError, match="run.json"):
        load_run(out)


CHECKPOINT_FAULTS = {
    "unknown model_config key": (lambda c: c["model_config"].update(width_multiplier=2),
                                 "model_config has an unknown field 'width_multiplier'"),
    "model_config of the wrong type": (lambda c: c.update(model_config=[2]), "model_config is [2], not an object"),
    "latent_dim a string": (lambda c: c["model_config"].update(latent_dim="2"), "model_config.latent_dim is '2'"),
    "history a number": (lambda c: c.update(history=5), "history is 5, not a list of rows"),
    "format a tensor": (lambda c: c.update(format=__import__("torch").tensor(2)), "has format a tensor"),
    "options.lr a string": (lambda c: c["run_info"]["options"].update(lr="fast"), "run_info.options.lr is 'fast'"),
}


@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
def test_damaged_checkpoint_fields_are_one_line_naming_the_field(fault, fake_mnist, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    damage, words = CHECKPOINT_FAULTS[fault]
    damage(ckpt)
    torch.save(ckpt, out / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    evaluated = main(["eval", str(out), "--iwae-k", "0", "--device", "cpu"])
    eval_line = capsys.readouterr().err
    for argv in ([*resume_argv(out), "--epochs", "2"],) + (() if fault.startswith("options") else
                                                            (["eval", str(out), "--iwae-k", "0", "--device", "cpu"],)):
        assert main(argv) == 2, argv
        line = one_line(capsys.readouterr().err)
        assert str(out / "checkpoint.pt") in line and words in line, line
    if fault.startswith("options"):  # eval does not read the train options
        assert evaluated == 0, eval_line
        (out / "eval.json").unlink()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_eval_without_run_json_reads_the_data_set_from_the_checkpoint(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0
    (out / "run.json").unlink()
    assert main(["eval", str(out), "--iwae-k", "0", "--device", "cpu"]) == 0
    assert strict_json(out / "eval.json")["test_images"] == N_TRAIN


def test_eval_of_a_folder_that_is_no_run_leaves_no_lock(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    assert main(["eval", str(home), "--device", "cpu"]) == 2
    assert "is not a run directory" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


def test_relative_data_root_is_stored_absolute_and_a_moved_one_is_explained(fake_mnist, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(fake_mnist.parent)
    out = tmp_path / "run"
    argv = train_argv(Path(fake_mnist.name), out, "--epochs", "1")  # --data-root mnist-data, as typed
    assert main(argv) == 0
    assert strict_json(out / "run.json")["run_info"]["data_root"] == str(fake_mnist)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working directory
    assert main(["eval", str(out), "--iwae-k", "0", "--device", "cpu"]) == 0
    assert main([*resume_argv(out), "--epochs", "2"]) == 0
    fake_mnist.rename(tmp_path / "moved")
    capsys.readouterr()
    for argv in (["eval", str(out), "--iwae-k", "0", "--device", "cpu"], [*resume_argv(out), "--epochs", "3"]):
        assert main(argv) == 2
        line = one_line(capsys.readouterr().err)
        assert str(fake_mnist) in line and f"recorded in the run {out}" in line and "--data-root" in line, line
    assert main([*resume_argv(out), "--epochs", "3", "--data-root", str(tmp_path / "moved")]) == 0


def test_malicious_checkpoint_of_another_pickle_protocol_is_one_line(tmp_path, capsys):
    """torch warns about pickle protocol 4 ("please file an issue") before it refuses the file: one line still."""
    import torch

    ckpt = _tiny_run(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    torch.save({"format": 2, "epoch": 1, "model_state": Payload(marker), "history": []}, ckpt, pickle_protocol=4)
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert "is corrupt or not a vaelib checkpoint" in one_line(capsys.readouterr().err)
    assert not marker.exists()


def test_sighup_saves_the_pending_epochs(fake_mnist, tmp_path, monkeypatch):
    """A dropped SSH session: SIGHUP is handled like SIGTERM."""
    from vaelib import training

    real, calls = training.train_epoch, []

    def epoch_then_sighup(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", epoch_then_sighup)
    out = tmp_path / "run"
    assert wait_exit_code(fork_main(train_argv(fake_mnist, out), tmp_path / "log")) == 129
    assert "interrupted by SIGHUP" in one_line((tmp_path / "log" / "err").read_text())
    assert final_state(out)[0] == 3


def test_eval_json_goes_when_a_resume_replaces_the_checkpoint_it_evaluated(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 0
    assert main(["eval", str(out), "--iwae-k", "0", "--device", "cpu"]) == 0
    assert main([*resume_argv(out), "--epochs", "1"]) == 0  # nothing trained: still the epoch evaluated
    assert "nothing to train" in capsys.readouterr().out and (out / "eval.json").exists()
    assert main([*resume_argv(out), "--epochs", "2"]) == 0
    assert not (out / "eval.json").exists()


def test_resume_with_fewer_epochs_than_done_refuses_and_changes_nothing(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out, "--epochs", "2")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*resume_argv(out), "--epochs", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "trained 2 epochs already" in line and "give at least 2" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_full_disk_names_the_file_and_the_epoch_kept(fake_mnist, tmp_path, monkeypatch, capsys):
    from vaelib import runs

    real, calls = runs.save_checkpoint, []

    def disk_full_at_epoch_4(state, path):
        calls.append(state["epoch"])
        if state["epoch"] == 4:  # a write into a full disk names no file (it is a write on a descriptor)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(state, path)

    monkeypatch.setattr(runs, "save_checkpoint", disk_full_at_epoch_4)
    out = tmp_path / "run"
    assert main(train_argv(fake_mnist, out)) == 2
    line = one_line(capsys.readouterr().err)
    assert f"cannot write {out / 'checkpoint.pt'}: no space left on the device" in line, line
    assert "still holds epoch 2" in line
    assert final_state(out)[0] == 2 == len(strict_json(out / "history.json"))


def test_atomic_write_names_the_file_a_write_fault_hit(tmp_path, monkeypatch):
    from vaelib import runs

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        runs.write_json(tmp_path / "eval.json", {"a": 1})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "eval.json")
    assert list(tmp_path.iterdir()) == []


def test_huge_beta_divergence_advises_a_smaller_beta(fake_mnist, tmp_path, capsys):
    assert main(train_argv(fake_mnist, tmp_path / "run", "--beta", "1e308", "--epochs", "1")) == 2
    line = one_line(capsys.readouterr().err)
    assert "smaller beta" in line and "learning rate" not in line, line


def test_train_size_beyond_the_data_says_so(fake_mnist, tmp_path, capsys):
    assert main(train_argv(fake_mnist, tmp_path / "run", "--epochs", "0", "--train-size", "1000")) == 0
    line = one_line(capsys.readouterr().err)
    assert f"--train-size 1000 is more than the {N_TRAIN} train images" in line, line


def test_lock_that_is_a_symlink_is_named(fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(".lock")  # a loop: "Too many levels of symbolic links"
    assert main(train_argv(fake_mnist, out, "--epochs", "1")) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{out / '.lock'} is a symbolic link, not vaelib's run lock" in line, line


def test_a_resume_may_lower_the_lr_but_not_below_lr_final(tmp_path):
    import torch

    from vaelib.models import build_vae
    from vaelib.runs import RunMismatchError
    from vaelib.training import fit

    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(0))
    fit(build_vae(latent_dim=2, hidden=(8,)), x, epochs=1, lr=1e-2, lr_final=1e-3, out_dir=tmp_path, progress=False,
        device="cpu")
    for lr, words in ((1e-4, "below the run's lr_final"), (2e-2, "lr is 0.02 now but 0.01 in the run")):
        with pytest.raises(RunMismatchError, match=words):
            fit(build_vae(latent_dim=2, hidden=(8,)), x, epochs=2, lr=lr, lr_final=1e-3, out_dir=tmp_path,
                resume=True, progress=False, device="cpu")
    result = fit(build_vae(latent_dim=2, hidden=(8,)), x, epochs=2, lr=5e-3, lr_final=1e-3, out_dir=tmp_path,
                 resume=True, progress=False, device="cpu")
    assert [row["lr"] for row in result.history] == [1e-2, 1e-3]  # the new schedule from 5e-3 ends at lr_final
