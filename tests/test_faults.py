"""Fault injection, done as a user would: bad options, wrong or damaged data, unreadable folders, interrupts.

Every fault must give one clear line (CLI: exit 2, 130 for Ctrl-C, 143 for SIGTERM) and lose nothing. The data
tests use tiny IDX files written here; to test the checksum logic without the real data sets, the published MD5
sums are replaced by those of two fake data sets. Probes that need the real Fashion-MNIST files skip without them.
"""

from __future__ import annotations

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
