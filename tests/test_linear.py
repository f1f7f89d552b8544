"""vaelib.linear: the exact linear-Gaussian model and maximum-likelihood pPCA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as td

from vaelib.linear import LinearGaussian, ppca_mle

F64 = torch.float64


def _model(
    d: int = 5, k: int = 3, sigma: float = 0.4, seed: int = 0, dtype: torch.dtype = F64
) -> LinearGaussian:
    return LinearGaussian.random(d, k, sigma, torch.Generator().manual_seed(seed), dtype)


def _random_diag_q(batch: tuple[int, ...], k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q_mu = 2.0 * torch.randn(*batch, k, generator=gen, dtype=F64)
    q_log_var = 3.0 * torch.randn(*batch, k, generator=gen, dtype=F64)  # sigma_q from ~e^-4 to ~e^4
    return q_mu, q_log_var


# --- evidence and posterior ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("d", "k", "sigma"), [(1, 1, 1.0), (2, 1, 0.3), (6, 3, 0.05), (4, 6, 2.0), (10, 2, 1e-2)]
)
def test_log_marginal_matches_torch_mvn(d: int, k: int, sigma: float) -> None:
    model = _model(d, k, sigma, seed=d + k)
    x = model.sample(7, torch.Generator().manual_seed(1)) + torch.randn(7, d, dtype=F64)  # typical and not
    cov = model.W @ model.W.T + sigma**2 * torch.eye(d, dtype=F64)
    mvn = td.MultivariateNormal(model.b, covariance_matrix=cov)
    torch.testing.assert_close(model.log_marginal(x), mvn.log_prob(x), rtol=1e-10, atol=1e-10)


def test_log_marginal_float32() -> None:
    model64 = _model(8, 3, 0.5)
    model32 = LinearGaussian(model64.W.float(), model64.b.float(), 0.5)
    x = model64.sample(11, torch.Generator().manual_seed(2))
    got = model32.log_marginal(x.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), model64.log_marginal(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_shapes(batch: tuple[int, ...]) -> None:
    model = _model(5, 3)
    x = torch.randn(*batch, 5, dtype=F64)
    q_mu, q_log_var = _random_diag_q(batch, 3, seed=0)
    mean, cov = model.posterior(x)
    assert model.log_marginal(x).shape == batch
    assert mean.shape == (*batch, 3) and cov.shape == (3, 3)
    assert model.elbo(x, q_mu, q_log_var).shape == batch
    assert model.elbo_full(x, mean, cov).shape == batch
    assert model.kl_to_posterior(x, q_mu, torch.diag_embed(q_log_var.exp())).shape == batch
    assert model.sample(9).shape == (9, 5)


def test_posterior_is_bayes_rule() -> None:
    """Against the textbook form: Sigma = (I + W^T W / sigma^2)^{-1}, m = Sigma W^T (x - b) / sigma^2."""
    model = _model(6, 3, 0.7)
    x = model.sample(5, torch.Generator().manual_seed(3))
    s2 = model.sigma**2
    cov_ref = torch.linalg.inv(torch.eye(3, dtype=F64) + model.W.T @ model.W / s2)
    mean_ref = (x - model.b) @ model.W @ cov_ref / s2
    mean, cov = model.posterior(x)
    torch.testing.assert_close(cov, cov_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)


def test_posterior_by_bayes_rule_pointwise() -> None:
    """log p(z|x) = log p(x|z) + log p(z) - log p(x) at random z, for the returned Gaussian."""
    model = _model(4, 2, 0.6)
    gen = torch.Generator().manual_seed(4)
    x = model.sample(3, gen)
    z = torch.randn(3, 2, generator=gen, dtype=F64)
    mean, cov = model.posterior(x)
    log_post = td.MultivariateNormal(mean, covariance_matrix=cov).log_prob(z)
    bayes = model.log_joint(x, z) - model.log_marginal(x)
    torch.testing.assert_close(log_post, bayes, rtol=1e-10, atol=1e-10)


# --- ELBO ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("d", "k", "sigma"), [(1, 1, 0.8), (5, 3, 0.4), (3, 5, 1.5), (20, 4, 0.1)])
def test_evidence_decomposition_random_diag_q(d: int, k: int, sigma: float) -> None:
    """log p(x) = ELBO(q) + KL(q || p(z|x)) for random diagonal q, with the KL from torch.distributions."""
    model = _model(d, k, sigma, seed=10 * d + k)
    x = model.sample(16, torch.Generator().manual_seed(5))
    q_mu, q_log_var = _random_diag_q((16,), k, seed=6)
    post_mean, post_cov = model.posterior(x)
    q = td.MultivariateNormal(q_mu, covariance_matrix=torch.diag_embed(q_log_var.exp()))
    kl = td.kl_divergence(q, td.MultivariateNormal(post_mean, covariance_matrix=post_cov))
    elbo = model.elbo(x, q_mu, q_log_var)
    gap = model.log_marginal(x) - (elbo + kl)
    assert gap.abs().max() <= 1e-8 * (1 + kl.abs().max()), gap
    assert (elbo <= model.log_marginal(x)).all()
    torch.testing.assert_close(model.kl_to_posterior(x, q_mu, q.covariance_matrix), kl, rtol=1e-9, atol=1e-9)


def test_elbo_full_equals_elbo_for_diagonal_q_and_identity_for_full_q() -> None:
    model = _model(6, 3, 0.5)
    x = model.sample(8, torch.Generator().manual_seed(7))
    q_mu, q_log_var = _random_diag_q((8,), 3, seed=8)
    torch.testing.assert_close(model.elbo_full(x, q_mu, torch.diag_embed(q_log_var.exp())),
                               model.elbo(x, q_mu, q_log_var), rtol=1e-12, atol=1e-10)
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(8, 3, 3, generator=gen, dtype=F64)
    q_cov = a @ a.mT + 0.1 * torch.eye(3, dtype=F64)
    gap = model.log_marginal(x) - model.elbo_full(x, q_mu, q_cov) - model.kl_to_posterior(x, q_mu, q_cov)
    assert gap.abs().max() <= 1e-8


def test_zero_gap_at_true_posterior() -> None:
    # Full covariance q at the exact posterior: ELBO = log p(x).
    model = _model(7, 3, 0.3)
    x = model.sample(10, torch.Generator().manual_seed(10))
    mean, cov = model.posterior(x)
    assert (model.log_marginal(x) - model.elbo_full(x, mean, cov)).abs().max() <= 1e-10
    assert model.kl_to_posterior(x, mean, cov).abs().max() <= 1e-10
    # Orthogonal columns of W make W^T W, hence the posterior, diagonal: the diagonal q reaches it too.
    q_basis, _ = torch.linalg.qr(torch.randn(7, 3, generator=torch.Generator().manual_seed(11), dtype=F64))
    ortho = LinearGaussian(q_basis * torch.tensor([3.0, 1.0, 0.2], dtype=F64), model.b, 0.3)
    mean, cov = ortho.posterior(x)
    assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-14)
    log_var = torch.log(torch.diagonal(cov)).expand_as(mean)
    assert (ortho.log_marginal(x) - ortho.elbo(x, mean, log_var)).abs().max() <= 1e-10


def test_expected_log_likelihood_matches_monte_carlo() -> None:
    """The trace term: the closed-form ELBO against a Monte-Carlo average over z ~ q, within 4 std errors."""
    model = _model(5, 2, 0.5)
    x = model.sample(1, torch.Generator().manual_seed(12))[0]
    q_mu = torch.tensor([0.3, -1.0], dtype=F64)
    q_log_var = torch.tensor([math.log(0.5), math.log(2.0)], dtype=F64)
    eps = torch.randn(40_000, 2, generator=torch.Generator().manual_seed(13), dtype=F64)
    z = q_mu + torch.exp(0.5 * q_log_var) * eps
    q = td.Normal(q_mu, torch.exp(0.5 * q_log_var))
    terms = model.log_joint(x, z) - q.log_prob(z).sum(-1)
    estimate, se = terms.mean(), terms.std() / math.sqrt(len(terms))
    assert abs(float(estimate - model.elbo(x, q_mu, q_log_var))) < 4 * float(se)


def test_sample_moments() -> None:
    model = _model(3, 2, 0.5)
    xs = model.sample(50_000, torch.Generator().manual_seed(14))
    cov = model.marginal_covariance()
    se_mean = torch.sqrt(torch.diagonal(cov) / len(xs))
    assert ((xs.mean(0) - model.b).abs() < 4 * se_mean).all()
    torch.testing.assert_close(torch.cov(xs.T), cov, rtol=0.05, atol=0.05)


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        LinearGaussian(torch.ones(3, 2), torch.ones(2), 1.0)
    with pytest.raises(ValueError):
        LinearGaussian(torch.ones(3, 2), torch.ones(3), 0.0)


# --- pPCA ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ppca_data() -> torch.Tensor:
    true = LinearGaussian.random(6, 2, 0.3, torch.Generator().manual_seed(20))
    return true.sample(400, torch.Generator().manual_seed(21))


def test_ppca_log_likelihood_equals_log_marginal_sum(ppca_data: torch.Tensor) -> None:
    fit = ppca_mle(ppca_data, 2)
    W, sigma2, mu, log_lik = fit  # unpacks as a tuple
    assert W.shape == (6, 2) and sigma2.ndim == 0 and mu.shape == (6,) and log_lik.ndim == 0
    torch.testing.assert_close(log_lik, fit.model().log_marginal(ppca_data).sum(), rtol=1e-12, atol=1e-9)
    eigvals = torch.linalg.eigvalsh(torch.cov(ppca_data.T, correction=0)).flip(0)
    torch.testing.assert_close(sigma2, eigvals[2:].mean())


def test_ppca_is_a_maximum(ppca_data: torch.Tensor) -> None:
    fit = ppca_mle(ppca_data, 2)
    gen = torch.Generator().manual_seed(22)
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(5):
            W = fit.W + scale * torch.randn(fit.W.shape, generator=gen, dtype=F64)
            b = fit.mu + scale * torch.randn(fit.mu.shape, generator=gen, dtype=F64)
            sigma = torch.sqrt(fit.sigma2) * math.exp(scale * float(torch.randn(1, generator=gen, dtype=F64)))
            assert LinearGaussian(W, b, sigma).log_marginal(ppca_data).sum() < fit.log_likelihood
    # A rotation of W's columns leaves the likelihood unchanged (W is identifiable only up to rotation).
    rot = torch.linalg.matrix_exp(torch.tensor([[0.0, 0.7], [-0.7, 0.0]], dtype=F64))
    rotated = LinearGaussian(fit.W @ rot, fit.mu, torch.sqrt(fit.sigma2)).log_marginal(ppca_data).sum()
    torch.testing.assert_close(rotated, fit.log_likelihood)


def test_ppca_gradient_vanishes(ppca_data: torch.Tensor) -> None:
    fit = ppca_mle(ppca_data, 2)
    W = fit.W.clone().requires_grad_()
    b = fit.mu.clone().requires_grad_()
    log_sigma = (0.5 * torch.log(fit.sigma2)).clone().requires_grad_()
    LinearGaussian(W, b, torch.exp(log_sigma)).log_marginal(ppca_data).mean().backward()
    for grad in (W.grad, b.grad, log_sigma.grad):
        assert grad.abs().max() < 1e-9


def test_ppca_float32(ppca_data: torch.Tensor) -> None:
    fit64 = ppca_mle(ppca_data, 2)
    fit32 = ppca_mle(ppca_data.float(), 2)
    assert fit32.W.dtype == torch.float32
    torch.testing.assert_close(fit32.log_likelihood.double(), fit64.log_likelihood, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close((fit32.W @ fit32.W.T).double(), fit64.W @ fit64.W.T, rtol=1e-4, atol=1e-4)


def test_ppca_rejects_bad_k(ppca_data: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        ppca_mle(ppca_data, 6)
