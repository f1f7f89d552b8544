"""Objectives: ELBO pieces, MC vs analytic KL, the IWAE bound's order in k, chunking and stability."""

import math

import pytest
import torch

from vaelib.distributions import log_normal_diag
from vaelib.models import build_vae
from vaelib.objectives import elbo, iwae_bound, kl_warmup, log_importance_weights


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = build_vae(latent_dim=4, hidden=(32,))
    x = torch.bernoulli(torch.rand(16, 784) * 0.5)
    return model, x


def test_elbo_terms_and_loss(model_and_data):
    model, x = model_and_data
    torch.manual_seed(3)
    t = elbo(model, x, beta=0.5)
    assert t.elbo.shape == t.rec.shape == t.kl.shape == (16,)
    torch.testing.assert_close(t.elbo, t.rec - t.kl)
    torch.testing.assert_close(t.loss(), -(t.rec - 0.5 * t.kl).mean())
    torch.testing.assert_close(t.loss(beta=2.0), -(t.rec - 2.0 * t.kl).mean())
    assert (t.kl >= 0).all()
    assert set(t.summary()) == {"elbo", "rec", "kl"}
    with pytest.raises(ValueError, match="analytic"):
        elbo(model, x, kl="exact")


def test_mc_kl_is_unbiased_for_analytic(model_and_data):
    model, x = model_and_data
    torch.manual_seed(4)
    with torch.no_grad():
        analytic = elbo(model, x).kl
        mc = elbo(model, x, kl="mc", n_samples=4000).kl
        single = torch.stack([elbo(model, x, kl="mc").kl for _ in range(200)])
    se = single.std(0) / math.sqrt(4000)
    assert ((mc - analytic).abs() < 4 * se + 1e-4).all()


def test_iwae_bound_above_elbo_and_nondecreasing_in_k(model_and_data):
    model, x = model_and_data
    torch.manual_seed(5)
    reps = 30
    with torch.no_grad():
        elbo_mean = torch.stack([elbo(model, x).elbo.mean() for _ in range(reps)])
        bounds = {k: torch.stack([iwae_bound(model, x, k=k).mean() for _ in range(reps)]) for k in (1, 5, 50)}
    means = {k: v.mean().item() for k, v in bounds.items()}
    ses = {k: v.std().item() / math.sqrt(reps) for k, v in bounds.items()}
    # IWAE_1 is the ELBO (MC KL) in expectation; then the bound rises with k (beyond Monte-Carlo noise).
    assert abs(means[1] - elbo_mean.mean().item()) < 4 * math.hypot(ses[1], elbo_mean.std().item() / reps**0.5)
    assert means[5] > means[1] - 4 * math.hypot(ses[5], ses[1])
    assert means[50] > means[5] - 4 * math.hypot(ses[50], ses[5])
    assert means[50] > elbo_mean.mean().item()


def test_iwae_matches_direct_logsumexp_and_chunking(model_and_data):
    model, x = model_and_data
    with torch.no_grad():
        torch.manual_seed(6)
        direct = torch.logsumexp(log_importance_weights(model, x, 64), 0) - math.log(64)
        torch.manual_seed(6)
        one_chunk = iwae_bound(model, x, k=64, chunk=64)
        torch.testing.assert_close(one_chunk, direct)
        torch.manual_seed(7)
        chunked = torch.stack([iwae_bound(model, x, k=64, chunk=5) for _ in range(20)]).mean(0)
        unchunked = torch.stack([iwae_bound(model, x, k=64) for _ in range(20)]).mean(0)
    assert (chunked - unchunked).abs().max() < 1.0  # the same estimator, different draws
    with pytest.raises(ValueError):
        iwae_bound(model, x, k=0)


def test_iwae_stable_with_extreme_log_weights():
    torch.manual_seed(0)
    model = build_vae(latent_dim=2, hidden=(8,), likelihood="gaussian", sigma=1e-3)  # log w ~ -1e6
    x = torch.rand(3, 784)
    with torch.no_grad():
        bound = iwae_bound(model, x, k=100, chunk=7)
        lw = log_importance_weights(model, x, 5)
    assert lw.max() < -1e5 and torch.isfinite(bound).all()


def test_iwae_gradient_flows(model_and_data):
    model, x = model_and_data
    model.zero_grad()
    (-iwae_bound(model, x, k=3).mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()


def test_kl_warmup_schedule():
    assert [kl_warmup(e, 4, 2.0) for e in range(1, 7)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert kl_warmup(1, 0, 0.7) == 0.7


def test_encoder_log_prob_reuses_stats(model_and_data):
    model, x = model_and_data
    mu, log_var = model.encoder(x)
    z = model.encoder.reparameterize(mu, log_var, 3)
    torch.testing.assert_close(model.encoder.log_prob(None, z, stats=(mu, log_var)), log_normal_diag(z, mu, log_var))


def test_given_stats_replace_the_encoder(model_and_data):
    """elbo/iwae_bound with ``stats`` use that q, not encoder(x): compared with torch.distributions on a q that the
    encoder could not produce (ignoring stats would give the encoder's q, a different value)."""
    model, x = model_and_data
    x = x[:4]
    torch.manual_seed(5)
    mu, log_var = torch.randn(4, 4), torch.randn(4, 4) - 1.0
    q = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    p = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    kl = torch.distributions.kl_divergence(q, p).sum(-1)
    z = q.sample((4000,))
    rec = torch.distributions.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
    ref = rec.mean(0) - kl
    se = rec.std(0) / math.sqrt(4000)
    with torch.no_grad():
        terms = elbo(model, x, n_samples=4000, stats=(mu, log_var))
        torch.testing.assert_close(terms.kl, kl)
        assert ((terms.elbo - ref).abs() < 4 * math.sqrt(2) * se).all()
        own = elbo(model, x, n_samples=4000)
        assert ((own.elbo - ref).abs() > 8 * se).any()
        torch.manual_seed(6)  # the same noise eps for both routes: z = mu + s * eps
        z = mu + (0.5 * log_var).exp() * torch.randn(100, 4, 4)
        log_w = (torch.distributions.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
                 + p.log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
        torch.manual_seed(6)
        bound = iwae_bound(model, x, k=100, chunk=100, stats=(mu, log_var))
        torch.testing.assert_close(bound, torch.logsumexp(log_w, 0) - math.log(100))
