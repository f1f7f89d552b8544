"""The run's settings: what fit records in run.json and its checkpoint (pinned: the book's reference models and old
runs are compared against these keys and values)."""

import json

import pytest
import torch

from vaelib.models import build_vae
from vaelib.runs import load_checkpoint
from vaelib.training import fit

DATA = "(160, 784) float32 sha256:f5c793cb653a07de"


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 784, generator=g)
    x = (protos[torch.randint(0, 4, (192,), generator=g)] * 0.8 + 0.2 * torch.rand(192, 784, generator=g))
    return x[:160], x[160:]


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
    torch.manual_seed(0)
    fit(build_vae(latent_dim=2, hidden=(16,)), *data, out_dir=tmp_path, progress=False, device="cpu", **kwargs)
    recorded = json.loads((tmp_path / "run.json").read_text())["settings"]
    assert list(recorded.items()) == expected
    assert list(load_checkpoint(tmp_path / "checkpoint.pt")["settings"].items()) == expected
