"""The reference models (vaelib.reference): the registry, training with a validation split and the best epoch kept
(resumable after an interrupt), export, and loading with its checks.

Training is exercised on a tiny stand-in (a few hundred images, a small network) through the very code path of
``make reference``; the shipped weights themselves are checked against their own recorded validation figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from vaelib import reference
from vaelib.cli import main
from vaelib.models import build_vae
from vaelib.reference import ReferenceError


@pytest.fixture
def tiny(monkeypatch):
    """A registry holding one small model trained on 300 images with 100 for validation (CPU, seconds)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(500, 784, generator=gen) ** 3  # mostly dark pixels, like the data

    def splits(data, root=None, download=False):
        from vaelib.data import dynamic_binarize

        return {"train": images[:300], "valid": dynamic_binarize(images[300:400], torch.Generator().manual_seed(7)),
                "test": dynamic_binarize(images[400:], torch.Generator().manual_seed(2024))}

    spec = reference.ReferenceSpec("tiny", "a test model", (0,), dict(arch="mlp", latent_dim=4, hidden=(32,)),
                                   epochs=12, batch_size=50, lr=3e-3, lr_final=1e-3)
    monkeypatch.setattr(reference, "REFERENCES", {"tiny": spec})
    monkeypatch.setattr(reference, "N_TRAIN", 300)
    monkeypatch.setattr(reference, "splits", splits)
    return spec


def _train(tmp_path: Path) -> Path:
    weights = tmp_path / "weights"
    reference.train_one("tiny", tmp_path / "runs", log=lambda line: None, weights_dir=weights)
    return weights


def test_registry_builds_every_model_and_names_the_chapters():
    for name, s in reference.REFERENCES.items():
        assert s.name == name and s.chapters and s.summary
        model = build_vae(**s.model)
        assert model.config["arch"] == s.model["arch"]
        assert set(s.fit_settings()) <= {"epochs", "batch_size", "lr", "lr_final", "beta", "warmup_epochs",
                                         "binarize", "seed", "objective", "k", "n_train"}
    chapters = {c for s in reference.REFERENCES.values() for c in s.chapters}
    assert chapters == {6, 7, 9, 11, 12, 13}


def test_plateau_gain_by_hand():
    # 20 epochs: the last 10 % are epochs 19-20; the best before them is 5.0 (epoch 18), after 4.95.
    losses = [10.0 - 0.5 * i for i in range(11)] + [5.0] * 7 + [4.97, 4.95]
    assert reference.plateau_gain(losses) == pytest.approx(0.05)
    assert reference.converged(losses)
    # Still falling by 0.3 per epoch: 0.6 over the last two of 20 epochs.
    falling = [100 - 0.3 * i for i in range(20)]
    assert reference.plateau_gain(falling) == pytest.approx(0.6) and not reference.converged(falling)
    assert reference.plateau_gain([1.0] * 9) is None  # too short to say


def test_train_export_load_round_trip(tiny, tmp_path):
    weights = _train(tmp_path)
    stored = reference.info("tiny", weights)
    rows = reference.history("tiny", weights)["valid"]
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    best = min(rows, key=lambda r: r["valid_loss"])
    assert stored["reference"]["best_epoch"] == best["epoch"]
    assert stored["settings"]["lr_final"] == 1e-3 and stored["reference"]["spec"]["name"] == "tiny"
    model = reference.load("tiny", "cpu", weights)
    assert not model.training
    # The shipped weights are the best epoch's: their validation -ELBO, recomputed here with other random draws,
    # matches the one recorded during training within 4 standard errors (the last epoch's weights would not,
    # where training was still moving: checked below).
    valid = reference.splits("binarized")["valid"]
    torch.manual_seed(123)
    from vaelib.objectives import elbo

    with torch.no_grad():
        values = -elbo(model, valid).elbo
    se = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - best["valid_loss"]) < 4 * math.sqrt(2) * se


def test_the_exported_epoch_is_the_best_not_the_last(tiny, tmp_path, monkeypatch):
    # Validation losses that get worse after epoch 3: the export must take epoch 3's weights.
    real = reference.valid_loss
    monkeypatch.setattr(reference, "valid_loss",
                        lambda s, model, row, valid: real(s, model, row, valid) + (0 if row["epoch"] <= 3 else 50.0))
    weights = _train(tmp_path)
    assert reference.info("tiny", weights)["reference"]["best_epoch"] == 3
    from safetensors import safe_open

    with safe_open(weights / "tiny" / reference.MODEL_FILE, framework="pt") as f:
        assert json.loads(f.metadata()["epoch"]) == 3


def test_an_interrupted_run_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    straight = reference.history("tiny", _train(tmp_path / "a"))["valid"]

    calls = {"n": 0}
    real_call = reference._Tracker.__call__

    def stop_after_five(self, row, model):
        real_call(self, row, model)
        calls["n"] += 1
        if row["epoch"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(reference._Tracker, "__call__", stop_after_five)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b")
    monkeypatch.setattr(reference._Tracker, "__call__", real_call)
    with pytest.raises(ReferenceError, match="not finished"):
        reference.export("tiny", tmp_path / "b" / "runs", tmp_path / "b" / "weights")
    resumed = reference.history("tiny", _train(tmp_path / "b"))["valid"]
    assert [r["epoch"] for r in resumed] == list(range(1, 13))
    assert [r["valid_loss"] for r in resumed] == pytest.approx([r["valid_loss"] for r in straight], abs=1e-4)


def test_a_corrupt_weight_file_is_one_clear_line(tiny, tmp_path):
    weights = _train(tmp_path)
    path = weights / "tiny" / reference.MODEL_FILE
    payload = bytearray(path.read_bytes())
    payload[-5] ^= 0xFF  # one flipped byte in the last tensor
    path.write_bytes(bytes(payload))
    with pytest.raises(ReferenceError) as err:
        reference.load("tiny", "cpu", weights)
    message = str(err.value)
    assert "\n" not in message and "corrupt" in message and "make reference NAME=tiny" in message


def test_missing_and_mismatched_models_are_refused(tiny, tmp_path):
    with pytest.raises(ReferenceError, match="not in .*make reference NAME=tiny"):
        reference.load("tiny", "cpu", tmp_path / "nowhere")
    with pytest.raises(ReferenceError, match="no reference model 'nope'"):
        reference.load("nope", "cpu", tmp_path)
    weights = _train(tmp_path)
    run_json = weights / "tiny" / reference.RUN_FILE
    run = json.loads(run_json.read_text())
    run["settings"]["lr"] = 1e-2
    run_json.write_text(json.dumps(run))
    with pytest.raises(ReferenceError, match="settings other than its spec's"):
        reference.load("tiny", "cpu", weights)
    run["settings"]["lr"] = 3e-3
    run["model_config"]["latent_dim"] = 5
    run_json.write_text(json.dumps(run))
    with pytest.raises(ReferenceError, match="is not the spec's"):
        reference.load("tiny", "cpu", weights)


def test_cli_reference_unknown_name_is_exit_2(capsys):
    assert main(["reference", "train", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no reference model 'no-such-model'" in err


SHIPPED = reference.WEIGHTS_DIR / "registry.json"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no reference models shipped yet")
@pytest.mark.parametrize("name", sorted(reference.REFERENCES))
def test_shipped_model_is_its_recorded_best_epoch(name):
    """Each shipped model loads (checksum, settings) and its validation loss, recomputed with fresh draws on the
    validation split, agrees with the one recorded at its best epoch within 4 standard errors."""
    s = reference.spec(name)
    model = reference.load(name, "cpu")
    stored = reference.info(name)["reference"]
    valid = reference.splits(s.data)["valid"]
    torch.manual_seed(321)
    from vaelib.evaluation import iwae_bounds
    from vaelib.objectives import default_kl, elbo

    with torch.no_grad():
        if s.objective == "iwae":
            values = -iwae_bounds(model, valid, k=s.k)
        else:
            t = elbo(model, valid, kl=default_kl(model))
            values = -t.rec + s.beta * t.kl
    se = values.double().std().item() / math.sqrt(len(values))
    assert abs(values.double().mean().item() - stored["best_valid_loss"]) < 4 * math.sqrt(2) * se + 1e-6


def test_spec_fields_are_recorded(tiny, tmp_path):
    weights = _train(tmp_path)
    spec = reference.info("tiny", weights)["reference"]["spec"]
    assert spec == json.loads(json.dumps(dataclasses.asdict(tiny) | {"chapters": [0]}))


def test_readme_table_is_the_registry():
    """The README's table of reference models is what `python -m vaelib reference list` prints now."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [line for line in reference.table() if line not in readme]
    assert not missing, "README.md's reference table is stale; paste `python -m vaelib reference list`:\n" + \
        "\n".join(missing)


def test_every_shipped_file_is_package_data():
    """What `pip install` of the repository carries (Colab's route to the weights): every file under
    vaelib/weights matches a package-data pattern of pyproject.toml."""
    import ast
    import fnmatch
    import re

    root = Path(__file__).parents[1]
    # tomllib is Python >= 3.11 and the project supports 3.10: the one line is read directly.
    line = re.search(r"^\[tool\.setuptools\.package-data\]\s*\nvaelib = (\[.*\])$",
                     (root / "pyproject.toml").read_text(), re.MULTILINE)
    patterns = ast.literal_eval(line.group(1))
    shipped = [p.relative_to(root / "vaelib").as_posix() for p in (root / "vaelib" / "weights").rglob("*")
               if p.is_file() and not p.name.startswith(".")]
    assert all(any(fnmatch.fnmatch(p, pat) for pat in patterns) for p in shipped), shipped
    assert any(fnmatch.fnmatch("weights/burda/model.safetensors", pat) for pat in patterns)


def test_training_a_finished_model_again_changes_nothing(tiny, tmp_path):
    """`make reference` run again over finished runs re-exports them as they are: the weights and the record of
    who trained them (run_info's commit and threads) stay."""
    weights = _train(tmp_path)
    before = {p.name: p.read_bytes() for p in (weights / "tiny").iterdir()}
    reference.train_one("tiny", tmp_path / "runs", threads=2, log=lambda line: None, weights_dir=weights)
    assert {p.name: p.read_bytes() for p in (weights / "tiny").iterdir()} == before
