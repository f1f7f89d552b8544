"""Models: shapes, dtypes, densities against torch.distributions, bad inputs, gradients."""

import pytest
import torch
import torch.distributions as td

from vaelib.models import (
    LIKELIHOODS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    LinearEncoder,
    StandardNormalPrior,
    build_vae,
)

D_IN, D_Z = 784, 3


@pytest.mark.parametrize("arch", ["mlp", "conv", "linear", "burda"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_shapes_and_dtypes(arch, likelihood):
    torch.manual_seed(0)
    model = build_vae(arch, latent_dim=D_Z, hidden=(16,), likelihood=likelihood)
    x = torch.rand(5, D_IN)
    mu, log_var = model.encoder(x)
    assert mu.shape == log_var.shape == (5, D_Z) and mu.dtype == torch.float32
    assert model.encoder.sample(x).shape == (5, D_Z)
    z = model.encoder.sample(x, n=4)
    assert z.shape == (4, 5, D_Z)
    assert model.decoder.log_prob(x, z).shape == (4, 5)
    assert model.encoder.log_prob(x, z).shape == (4, 5)
    assert model.decoder(z).shape == (4, 5, D_IN)
    assert model.prior.log_prob(z).shape == (4, 5)
    assert model.prior.sample(7).shape == (7, D_Z)
    assert model.sample(6).shape == (6, D_IN)
    assert model.reconstruct(x).shape == (5, D_IN)
    assert model.decoder.sample(z[0]).shape == (5, D_IN)
    assert model(x).elbo.shape == (5,)
    rebuilt = build_vae(**model.config)
    assert type(rebuilt.encoder) is type(model.encoder)
    rebuilt.load_state_dict(model.state_dict())


def test_bernoulli_family_means_are_images():
    model = build_vae(latent_dim=D_Z, hidden=(8,))
    out = model.sample(10)
    assert out.min() >= 0 and out.max() <= 1
    cb = build_vae(latent_dim=D_Z, hidden=(8,), likelihood="continuous-bernoulli")
    out = cb.sample(10)
    assert out.min() >= 0 and out.max() <= 1


def test_burda_configuration():
    model = build_vae("burda")
    sizes = [m.out_features for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [200, 200, 100]  # 784-200-200-(2 x 50)
    assert model.latent_dim == 50 and model.config["activation"] == "tanh"
    assert isinstance(model.decoder.likelihood, BernoulliLikelihood)
    assert any(isinstance(m, torch.nn.Tanh) for m in model.decoder.modules())


def test_linear_vae_structure():
    model = build_vae("linear", input_dim=6, latent_dim=2)
    assert isinstance(model.encoder, LinearEncoder)
    lik = model.decoder.likelihood
    assert isinstance(lik, GaussianLikelihood) and lik.log_var.requires_grad and lik.log_var.shape == ()
    x = torch.randn(4, 6) * 3  # Gaussian data need not lie in [0, 1]
    _, log_var = model.encoder(x)
    assert torch.equal(log_var[0], log_var[3])  # the posterior variance does not depend on x
    assert isinstance(model.decoder.net, torch.nn.Linear)


def test_gaussian_sigma_variants():
    fixed = build_vae(likelihood="gaussian", sigma=0.5, hidden=(8,), latent_dim=2).decoder.likelihood
    assert not any(p.requires_grad for p in fixed.parameters())
    torch.testing.assert_close(fixed.sigma, torch.tensor(0.5))
    pixel = build_vae(likelihood="gaussian-pixel", hidden=(8,), latent_dim=2).decoder.likelihood
    assert pixel.log_var.shape == (D_IN,) and pixel.log_var.requires_grad
    sig = build_vae(likelihood="gaussian", mean_activation="sigmoid", hidden=(8,), latent_dim=2).sample(3)
    assert sig.min() >= 0 and sig.max() <= 1


def test_densities_match_torch_distributions():
    torch.manual_seed(1)
    params = torch.randn(4, 10) * 3
    x01 = torch.rand(4, 10)
    xbin = torch.bernoulli(x01)
    torch.testing.assert_close(BernoulliLikelihood().log_prob(xbin, params),
                               td.Bernoulli(logits=params).log_prob(xbin).sum(-1))
    torch.testing.assert_close(ContinuousBernoulliLikelihood().log_prob(x01, params),
                               td.ContinuousBernoulli(logits=params).log_prob(x01).sum(-1), rtol=1e-4, atol=1e-4)
    g = GaussianLikelihood(10, sigma=0.3, learn="pixel")
    torch.testing.assert_close(g.log_prob(x01, params), td.Normal(params, 0.3).log_prob(x01).sum(-1))
    prior = StandardNormalPrior(10)
    torch.testing.assert_close(prior.log_prob(params), td.Normal(0.0, 1.0).log_prob(params).sum(-1))
    mu, log_var = torch.randn(4, 10), torch.randn(4, 10)
    q = td.Independent(td.Normal(mu, torch.exp(0.5 * log_var)), 1)
    p = td.Independent(td.Normal(torch.zeros(10), torch.ones(10)), 1)
    torch.testing.assert_close(prior.kl(mu, log_var), td.kl_divergence(q, p))
    model = build_vae(latent_dim=10, hidden=(8,))
    xin = torch.rand(4, D_IN)
    z = torch.randn(4, 10)
    mu, log_var = model.encoder(xin)
    q = td.Independent(td.Normal(mu, torch.exp(0.5 * log_var)), 1)
    torch.testing.assert_close(model.encoder.log_prob(xin, z), q.log_prob(z))


def test_gradients_reach_encoder_and_decoder():
    torch.manual_seed(0)
    for arch in ("mlp", "conv", "linear"):
        model = build_vae(arch, latent_dim=D_Z, hidden=(8,), likelihood="gaussian-learned")
        model(torch.rand(4, D_IN)).loss().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert model.encoder.parameters().__next__().grad.abs().sum() > 0
        assert model.decoder.likelihood.log_var.grad.abs() > 0


def test_bad_inputs_name_the_expected_shape():
    model = build_vae(latent_dim=D_Z, hidden=(8,))
    with pytest.raises(ValueError, match=r"\(batch, 784\).*flatten"):
        model.encoder(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(batch, 784\).*unsqueeze"):
        model.encoder(torch.rand(784))
    with pytest.raises(ValueError, match=r"\(batch, 784\)"):
        model(torch.rand(2, 100))
    with pytest.raises(TypeError, match="floating-point.*uint8"):
        model.encoder(torch.zeros(2, 784, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float64.*float32"):
        model.encoder(torch.rand(2, 784, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor|ndarray|list"):
        model.encoder([[0.0] * 784])
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        model.decoder(torch.randn(2, 5))
    for bad in (dict(arch="rnn"), dict(likelihood="poisson"), dict(activation="swish2"), dict(sigma=-1.0,
                likelihood="gaussian"), dict(arch="conv", input_dim=700)):
        with pytest.raises(ValueError):
            build_vae(**bad)
