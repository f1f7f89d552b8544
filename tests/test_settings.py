"""The run's settings: what fit records in run.json and its checkpoint (pinned: the book's reference models and old
runs are compared against these keys and values)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import toy_images

from vaelib.models import build_vae
from vaelib.runs import RunMismatchError, load_checkpoint
from vaelib.settings import TrainSettings
from vaelib.training import fit, fit_many

DATA = "(160, 784) float32 sha256:f5c793cb653a07de"


@pytest.fixture(scope="module")
def data():
    return toy_images()


def tiny():
    torch.manual_seed(0)
    return build_vae(latent_dim=2, hidden=(16,))


# Written from fit's run.json before TrainSettings existed (main at 55f2fda): keys, their order and values.
GOLDEN = {
    "elbo": (dict(epochs=2, batch_size=32, lr=2e-3, lr_final=1e-3, beta=0.5, warmup_epochs=1, binarize=True, seed=3,
                  checkpoint_every=2, eval_batch_size=7),
             [("epochs", 2), ("batch_size", 32), ("lr", 0.002), ("lr_final", 0.001), ("beta", 0.5),
              ("warmup_epochs", 1), ("binarize", True), ("seed", 3), ("kl", "analytic"), ("objective", "elbo"),
              ("k", None), ("n_train", 160), ("data", DATA), ("optimizer", "adam")]),
    "iwae": (dict(epochs=1, batch_size=40, objective="iwae", k=3, kl="mc"),
             [("epochs", 1), ("batch_size", 40), ("lr", 0.001), ("lr_final", None), ("beta", 1.0),
              ("warmup_epochs", 0), ("binarize", False), ("seed", 0), ("kl", "mc"), ("objective", "iwae"), ("k", 3),
              ("n_train", 160), ("data", DATA), ("optimizer", "adam")]),
    "custom": (dict(epochs=1, optimizer=lambda params: torch.optim.SGD(params, lr=0.1)),
               [("epochs", 1), ("batch_size", 128), ("lr", 0.001), ("lr_final", None), ("beta", 1.0),
                ("warmup_epochs", 0), ("binarize", False), ("seed", 0), ("kl", "analytic"), ("objective", "elbo"),
                ("k", None), ("n_train", 160), ("data", DATA), ("optimizer", "custom")]),
}


@pytest.mark.parametrize("case", GOLDEN)
def test_run_json_settings_are_todays(tmp_path, data, case):
    kwargs, expected = GOLDEN[case]
    fit(tiny(), *data, out_dir=tmp_path, progress=False, device="cpu", **kwargs)
    recorded = json.loads((tmp_path / "run.json").read_text())["settings"]
    assert list(recorded.items()) == expected
    assert list(load_checkpoint(tmp_path / "checkpoint.pt")["settings"].items()) == expected


# ------------------------------------------------------------------------------------------------ TrainSettings
IWAE_BETA = "objective='iwae' has no KL weight: beta must be 1 and warmup_epochs 0"
REJECTED = [
    (dict(epochs=-1), "epochs must be an integer >= 0, got -1"),
    (dict(epochs=2.0), "epochs must be an integer >= 0, got 2.0"),
    (dict(epochs=True), "epochs must be an integer >= 0, got True"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(warmup_epochs=-1), "warmup_epochs must be an integer >= 0, got -1"),
    (dict(checkpoint_every=0), "checkpoint_every must be an integer >= 1, got 0"),
    (dict(eval_batch_size=0), "eval_batch_size must be an integer >= 1, got 0"),
    (dict(lr=0.0), "lr must be a positive number, got 0.0"),
    (dict(lr=float("nan")), "lr must be a positive number, got nan"),
    (dict(lr=float("inf")), "lr must be a positive number, got inf"),
    (dict(lr=None), "lr must be a positive number, got None"),
    (dict(lr="0.1"), "lr must be a positive number, got '0.1'"),
    (dict(lr_final=-1e-4), "lr_final must be a positive number, got -0.0001"),
    (dict(beta=-0.5), "beta must be >= 0, got -0.5"),
    (dict(beta=float("nan")), "beta must be >= 0, got nan"),
    (dict(kl="exact"), "kl must be one of ('analytic', 'mc'), got 'exact'"),
    (dict(objective="vi"), "objective must be one of ('elbo', 'iwae'), got 'vi'"),
    (dict(objective="iwae"), "objective='iwae' needs k, the number of importance samples, an integer >= 1; got None"),
    (dict(objective="iwae", k=0), "objective='iwae' needs k, the number of importance samples, an integer >= 1; got 0"),
    (dict(objective="iwae", k=2, beta=0.5), IWAE_BETA),
    (dict(objective="iwae", k=2, warmup_epochs=3), IWAE_BETA),
    (dict(k=5), "k=5 is the IWAE bound's number of samples; pass objective='iwae' with it"),
]


@pytest.mark.parametrize(("values", "message"), REJECTED, ids=[str(v) for v, _ in REJECTED])
def test_settings_refuse_each_bad_value_with_its_message(data, values, message):
    with pytest.raises(ValueError) as made:
        TrainSettings(**values)
    assert str(made.value) == message
    with pytest.raises(ValueError) as fitted:  # fit's keywords build the same object: the same check, once
        fit(build_vae(latent_dim=2, hidden=(16,)), data[0], progress=False, **values)
    assert str(fitted.value) == message
    with pytest.raises(ValueError) as replaced:  # a changed copy is checked again
        TrainSettings().replace(**values)
    assert str(replaced.value) == message


@pytest.mark.parametrize("values", [dict(epochs=0), dict(beta=0), dict(beta=1e308), dict(lr=1, lr_final=2),
                                    dict(objective="iwae", k=1), dict(kl="mc"), dict(beta=np.float32(0.5))])
def test_settings_accept_the_edges(values):
    assert TrainSettings(**values) == TrainSettings().replace(**values)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainSettings().epochs = 3


def test_kl_default_comes_from_the_model():
    standard, vamp = build_vae(latent_dim=2, hidden=(16,)), build_vae(latent_dim=2, hidden=(16,), prior="vamp",
                                                                      pseudo_inputs=3)
    assert TrainSettings().for_model(standard).kl == "analytic"
    assert TrainSettings().for_model(vamp).kl == "mc"
    with pytest.raises(ValueError, match="kl='analytic' needs a closed-form KL, which the prior VampPrior"):
        TrainSettings(kl="analytic").for_model(vamp)
    with pytest.raises(ValueError, match="kl is not set"):  # a record must say which estimator ran
        TrainSettings().recorded(n_train=1, data="")


def test_fit_takes_the_object_or_its_keywords_not_both(tmp_path, data):
    settings = TrainSettings(epochs=2, batch_size=32, lr=2e-3, lr_final=1e-3, warmup_epochs=1, binarize=True, seed=3)
    by_object = fit(tiny(), *data, settings, progress=False, out_dir=tmp_path / "a")
    by_keywords = fit(tiny(), *data, progress=False, out_dir=tmp_path / "b", **dataclasses.asdict(settings))
    assert by_object.history[-1]["test_elbo"] == by_keywords.history[-1]["test_elbo"]
    for a, b in zip(by_object.model.parameters(), by_keywords.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (json.loads((tmp_path / "a" / "run.json").read_text())["settings"] ==
            json.loads((tmp_path / "b" / "run.json").read_text())["settings"])
    with pytest.raises(TypeError, match="settings and the setting keywords epochs"):
        fit(tiny(), data[0], settings=settings, epochs=3, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        fit(tiny(), data[0], epoch=3, progress=False)
    with pytest.raises(TypeError, match="settings must be a TrainSettings, got dict"):
        fit(tiny(), data[0], None, {"epochs": 3}, progress=False)


def test_resume_compares_the_object_with_the_run(tmp_path, data):
    settings = TrainSettings(epochs=1, batch_size=32)
    fit(tiny(), data[0], settings=settings, out_dir=tmp_path, progress=False)
    with pytest.raises(RunMismatchError, match="batch_size is 16 now but 32 in the run"):
        fit(tiny(), data[0], settings=settings.replace(epochs=2, batch_size=16), out_dir=tmp_path, resume=True,
            progress=False)
    result = fit(tiny(), data[0], settings=settings.replace(epochs=2, checkpoint_every=2), out_dir=tmp_path,
                 resume=True, progress=False)
    assert result.resumed_from == 1 and len(result.history) == 2


def test_fit_many_jobs_change_the_common_settings(data):
    common = TrainSettings(epochs=1, batch_size=32)
    jobs = [{"model": {"latent_dim": 2, "hidden": (16,)}, "beta": beta} for beta in (0.5, 2.0)]
    results = fit_many(jobs, data[0], processes=1, settings=common)
    assert [r.history[-1]["beta"] for r in results] == [0.5, 2.0]
    assert [len(r.history) for r in results] == [1, 1]


def test_record_of_a_truthy_binarize_is_a_bool():  # as fit recorded bool(binarize) before TrainSettings
    record = TrainSettings(binarize=1, kl="mc").recorded(n_train=3, data="d")
    assert record["binarize"] is True and list(record) == [name for name, _ in GOLDEN["elbo"][1]]


@pytest.mark.parametrize(("options", "expected"), [
    (["--epochs", "3", "--batch-size", "7", "--lr", "0.01", "--lr-final", "0.001", "--beta", "2", "--warmup-epochs",
      "1", "--binarize", "dynamic", "--seed", "5", "--kl", "mc", "--checkpoint-every", "4"],
     TrainSettings(epochs=3, batch_size=7, lr=0.01, lr_final=0.001, beta=2.0, warmup_epochs=1, binarize=True, seed=5,
                   kl="mc", checkpoint_every=4)),
    (["--binarize", "threshold", "--objective", "iwae", "--k", "5"],  # thresholded data are fixed: no redraws
     TrainSettings(objective="iwae", k=5)),
    ([], TrainSettings()),  # the CLI's defaults are fit's
])
def test_cli_builds_the_settings_from_its_options(options, expected):
    from vaelib.cli import _train_settings, build_parser

    assert _train_settings(build_parser().parse_args(["train", "--out", "x", *options])) == expected


def test_cli_refuses_bad_settings_before_reading_data(tmp_path, monkeypatch, capsys):
    """A combination only TrainSettings judges is one line (exit 2), before any data are looked for."""
    import vaelib.cli as cli
    import vaelib.data

    monkeypatch.setattr(cli, "_check_train_combinations", lambda args: None)  # the CLI's own words for these
    monkeypatch.setattr(vaelib.data, "load_split", lambda *a, **k: pytest.fail("data read before the check"))
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--k", "3", "--device", "cpu"]) == 2
    assert "k=3 is the IWAE bound's number of samples" in capsys.readouterr().err
