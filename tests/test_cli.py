"""CLI: help, bad arguments, missing run directory and data, train/eval round trip, Ctrl-C and --resume."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import needs_data

from vaelib.cli import main
from vaelib.data import find_dataset

TINY = ["--dataset", "fashion-mnist", "--latent", "2", "--hidden", "16", "--train-size", "256", "--test-size", "64",
        "--batch-size", "64", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def cached_splits(monkeypatch):
    """Decompressing and checksumming the 60k training images once per session is enough."""
    import vaelib.data as data

    real = data.load_split
    cache = _SPLIT_CACHE

    def load_split(name="fashion-mnist", split="train", root=None, **kw):
        key = (name, split, str(root), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = real(name, split, root, **kw)
        return cache[key]

    monkeypatch.setattr(data, "load_split", load_split)


_SPLIT_CACHE: dict = {}


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "vaelib", *args], capture_output=True, text=True, timeout=120)


def test_help_documents_every_option(capsys):
    from vaelib.cli import build_parser

    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name, sub in subparsers.items():
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.dest)


@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "-1", "--out", "x"],
    ["train", "--lr", "zero", "--out", "x"],
    ["train", "--lr-final", "-1", "--out", "x"],
    ["train", "--hidden", "4,a", "--out", "x"],
    ["train", "--arch", "rnn", "--out", "x"],
    ["train"],  # --out is required
    ["eval"],
    ["frobnicate"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_missing_run_dir_is_one_line_exit_2(tmp_path):
    proc = run_module("eval", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["train", "eval"])
def test_missing_device_is_one_line_exit_2(tmp_path, monkeypatch, capsys, command):
    """Checked before any data are read: one line naming the devices that exist."""
    import vaelib.data as data

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(data, "load_split", lambda *a, **k: pytest.fail("read data before checking the device"))
    argv = ["train", "--out", str(tmp_path / "r")] if command == "train" else ["eval", str(tmp_path)]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'cuda' is not available here; available: cpu" in err


def test_missing_data_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import vaelib.data as data

    monkeypatch.setattr(data, "search_path", lambda name, root=None: [tmp_path])
    assert main(["data", "fashion-mnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    assert main(["train", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


@needs_data
def test_data_command_prints_folder(capsys):
    assert main(["data", "fashion-mnist"]) == 0
    assert capsys.readouterr().out.strip() == str(find_dataset("fashion-mnist"))


@needs_data
def test_train_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--binarize", "dynamic", "--lr", "2e-3", "--lr-final", "5e-4",
                 "--out", str(out)]) == 0
    assert "run saved in" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and "test_elbo" in history[0]
    assert [row["lr"] for row in history] == pytest.approx([2e-3, 5e-4])
    assert main(["eval", str(out), "--iwae-k", "20", "--iwae-images", "8", "--test-size", "64", "--device",
                 "cpu"]) == 0
    text = capsys.readouterr().out
    assert "IWAE NLL (k=20, 8 images)" in text
    result = json.loads((out / "eval.json").read_text())
    assert result["iwae_images"] == 8 and len(result["kl_per_dimension"]) == 2
    assert result["iwae_nll"] < -result["test_elbo"] + 5  # IWAE tighter than the ELBO, within MC noise


@needs_data
def test_interrupt_exits_130_and_resume_continues(tmp_path, capsys, interrupt_at_epoch):
    out = tmp_path / "run"
    disarm = interrupt_at_epoch(2)
    argv = ["train", *TINY, "--epochs", "3", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "epoch 1" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    disarm()
    assert main([*argv, "--resume"]) == 0
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2, 3]


@needs_data
def test_resume_without_run_dir_is_one_line(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


@pytest.mark.parametrize("argv", [
    ["eval", "x", "--ais", "--ais-steps", "0"],
    ["eval", "x", "--ais", "--ais-chains", "two"],
    ["eval", "x", "--ais", "--ais-start", "posterior"],
    ["eval", "x", "--ais", "--ais-transition", "gibbs"],
])
def test_bad_ais_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


@needs_data
def test_eval_ais_beside_iwae(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--binarize", "dynamic", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--iwae-k", "500", "--iwae-images", "16", "--test-size", "64", "--ais",
                 "--ais-steps", "30", "--ais-chains", "4", "--ais-images", "16", "--device", "cpu"]) == 0
    assert "AIS NLL (T=30, k=4, 16 images)" in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["ais_images"] == 16 and result["ais_steps"] == 30 and result["ais_chains"] == 4
    assert 1 <= result["ais_ess_median"] <= 4
    # Two estimators of the same -log p(x) of a 2-dimensional latent model, on the same 16 images.
    assert abs(result["ais_nll"] - result["iwae_nll"]) < 4 * result["ais_nll_se"] + 1.0
