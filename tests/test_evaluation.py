"""Evaluation: test ELBO, IWAE NLL in chunks, active units, KL per dimension, reconstructions, samples."""

import math

import pytest
import torch

from vaelib.evaluation import (
    active_units,
    encode_means,
    evaluate_elbo,
    iwae_bounds,
    iwae_nll,
    kl_per_dimension,
    reconstructions,
    samples,
)
from vaelib.models import build_vae
from vaelib.objectives import elbo


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_vae(latent_dim=5, hidden=(16,)).eval()
    x = torch.bernoulli(torch.rand(50, 784) * 0.4)
    return model, x


def test_evaluate_elbo_matches_direct(setup):
    model, x = setup
    torch.manual_seed(1)
    got = evaluate_elbo(model, x, batch_size=7)
    torch.manual_seed(2)
    with torch.no_grad():
        direct = elbo(model, x)
    assert got["kl"] == pytest.approx(direct.kl.mean().item(), rel=1e-5)  # analytic: no noise
    assert got["elbo"] == pytest.approx(got["rec"] - got["kl"], rel=1e-6)
    assert abs(got["rec"] - direct.rec.mean().item()) < 5 * direct.rec.std().item() / math.sqrt(50) + 1e-3


def test_iwae_nll_chunked_memory_bound(setup):
    model, x = setup
    torch.manual_seed(3)
    small = iwae_bounds(model, x[:10], k=200, batch_size=3, max_elements=784 * 3 * 7)  # chunks of 7 samples
    big = iwae_bounds(model, x[:10], k=200)
    assert small.shape == big.shape == (10,) and small.dtype == torch.float64
    assert (small - big).abs().max() < 3.0 and abs((small - big).mean()) < 0.6  # same estimator, other draws
    nll = iwae_nll(model, x[:10], k=200)
    torch.manual_seed(4)
    neg_elbo = -evaluate_elbo(model, x[:10])["elbo"]
    assert nll < neg_elbo + 0.5  # the IWAE bound is tighter than the ELBO


def test_active_units_and_kl_per_dimension(setup):
    model, x = setup
    dead = build_vae(latent_dim=5, hidden=(16,))
    dead.load_state_dict(model.state_dict())
    with torch.no_grad():
        # Dimensions 0 and 3 ignore x: mean 0, variance 1 -> inactive, zero KL.
        for j in (0, 3):
            dead.encoder.head.weight[j].zero_()
            dead.encoder.head.bias[j] = 0.0
            dead.encoder.head.weight[5 + j].zero_()
            dead.encoder.head.bias[5 + j] = 0.0
        dead.encoder.head.weight[:5] *= 20  # the others vary strongly with x
    count, variances = active_units(dead, x)
    assert variances.shape == (5,)
    assert variances[0] == 0 and variances[3] == 0 and count == 3
    kl_dims = kl_per_dimension(dead, x)
    assert kl_dims.shape == (5,) and kl_dims[0].abs() < 1e-6 and kl_dims[3].abs() < 1e-6
    assert kl_dims.sum().item() == pytest.approx(evaluate_elbo(dead, x)["kl"], rel=1e-4)
    mu = encode_means(dead, x)
    torch.testing.assert_close(variances, mu.var(0, correction=0))


def test_reconstructions_and_samples(setup):
    model, x = setup
    rec = reconstructions(model, x, batch_size=8)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    a, b = samples(model, 4, seed=1), samples(model, 4, seed=1)
    assert a.shape == (4, 784) and torch.equal(a, b)


def test_evaluation_rejects_bad_input(setup):
    model, _ = setup
    with pytest.raises(ValueError, match=r"\(batch, 784\)"):
        evaluate_elbo(model, torch.rand(3, 28, 28))
    with pytest.raises(TypeError):
        iwae_nll(model, torch.zeros(3, 784, dtype=torch.uint8), k=2)


def test_per_dimension_results_carry_no_graph(setup):
    """Chapters hand these straight to NumPy and matplotlib: no autograd graph may hang on them."""
    model, x = setup
    assert not kl_per_dimension(model, x).requires_grad
    assert not active_units(model, x)[1].requires_grad
