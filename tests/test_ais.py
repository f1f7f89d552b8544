"""Annealed importance sampling (vaelib.ais) against exact answers.

- T = 1 is plain importance sampling from the start distribution: equal, to rounding, to objectives.iwae_bound with
  the same q (an independent code path: the weight written as log p(x, z) - log q(z|x)) and the same draws.
- On the linear-Gaussian model, whose log p(x) is exact (vaelib.linear), the estimate reaches log p(x) as T grows,
  and the weights are unbiased: E[w / p(x)] = 1.
- HMC and MALA leave a known Gaussian invariant (first and second moments within 4 standard errors); MALA, written
  with its proposal density, equals HMC with one leapfrog step draw for draw.
- Mutation tests: the unbiasedness check, run on AIS with a planted error (a wrong sign in the weight increment,
  a missing tau_t - tau_{t-1}, no Metropolis step, MALA without its proposal correction), must fail.
- The default pilot adaptation keeps E[w] = p(x); BDMC on the linear model sandwiches the exact log p(x).
"""

from __future__ import annotations

import math

import pytest
import torch

import vaelib.ais
from vaelib.ais import ais_log_likelihood, annealing_schedule, bdmc, effective_sample_size, hmc_step, mala_step
from vaelib.linear import LinearGaussian
from vaelib.models import build_vae
from vaelib.objectives import iwae_bound


def linear_model(seed: int = 0, d: int = 6, j: int = 2):
    """A float64 linear VAE with random decoder weights, its exact LinearGaussian twin and 64 points from it."""
    torch.manual_seed(seed)
    vae = build_vae(arch="linear", input_dim=d, latent_dim=j, sigma=0.5).double()
    with torch.no_grad():
        vae.decoder.net.weight.normal_()
        vae.decoder.net.bias.normal_()
    W, b = vae.decoder.net.weight.detach(), vae.decoder.net.bias.detach()
    exact = LinearGaussian(W, b, vae.decoder.likelihood.sigma.detach())
    x = exact.sample(64, torch.Generator().manual_seed(seed + 1))
    return vae, exact, x


def set_encoder_to_posterior(vae, exact: LinearGaussian, widen: float = 1.0) -> None:
    """Encoder mean = the exact posterior mean, variances = the posterior's diagonal times ``widen``."""
    W, b = exact.W, exact.b
    M = W.T @ W + exact.sigma**2 * torch.eye(W.shape[1], dtype=W.dtype)
    A = torch.linalg.solve(M, W.T)
    with torch.no_grad():
        vae.encoder.mean.weight.copy_(A)
        vae.encoder.mean.bias.copy_(-A @ b)
        vae.encoder.log_var.copy_(torch.log(torch.diagonal(exact.posterior(exact.b)[1]) * widen))


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


@pytest.mark.parametrize("start", ["encoder", "prior"])
def test_one_temperature_is_importance_sampling(start):
    vae, exact, x = linear_model()
    set_encoder_to_posterior(vae, exact, widen=3.0)
    result = ais_log_likelihood(vae, x, n_steps=1, n_chains=40, start=start, seed=7)
    # The same q through the IWAE bound: the encoder's own stats, or N(0, I) written as encoder stats.
    zeros = torch.zeros(len(x), 2, dtype=torch.float64)
    stats = None if start == "encoder" else (zeros, zeros)
    torch.manual_seed(7)
    reference = iwae_bound(vae, x, k=40, stats=stats)
    torch.testing.assert_close(result.log_px, reference, rtol=0, atol=1e-10)
    assert result.log_weights.shape == (40, len(x)) and result.acceptance.numel() == 0


def test_estimate_reaches_exact_log_px_as_t_grows():
    vae, exact, x = linear_model()
    log_p = exact.log_marginal(x)
    gaps, spread = {}, {}
    for n_steps in (1, 20, 400):
        # Not seed 1, the data's (linear_model draws x with seed + 1): chains seeded like the data would start at
        # the very z that generated each x, a hit by construction.
        result = ais_log_likelihood(vae, x, n_steps=n_steps, n_chains=8, start="prior", n_leapfrog=5,
                                    step_size=0.1, seed=101)
        gaps[n_steps] = mean_and_se(result.log_px - log_p)
        spread[n_steps] = result.log_weights.var(0).mean().item()  # Var(log w), averaged over the points
    # Importance sampling from the prior (T = 1) has log-weights thousands of nats^2 apart; annealing shrinks
    # that ...
    assert spread[1] > 100 > spread[20] > spread[400] and spread[400] < 0.5, spread
    # ... and the estimate is within 4 standard errors of log p(x) (plus 0.02 nats of the log's Jensen bias).
    gap, se = gaps[400]
    assert abs(gap) < 4 * se + 0.02, gaps
    assert abs(gap) < 0.1, gaps


@pytest.mark.parametrize("transition", ["hmc", "mala"])
def test_weights_are_unbiased(transition):
    """E[w] = p(x) for any T and invariant transitions; a proposal near the posterior keeps Var(w / p) small,
    so that the standard error means something. Fixed steps: exact AIS."""
    vae, exact, x = linear_model(seed=3)
    set_encoder_to_posterior(vae, exact, widen=2.0)
    result = ais_log_likelihood(vae, x, n_steps=10, n_chains=200, start="encoder", transition=transition,
                                n_leapfrog=3, step_size=0.05, target_acceptance=None, seed=2)
    ratio = torch.exp(result.log_weights - exact.log_marginal(x))
    mean, se = mean_and_se(ratio)
    assert abs(mean - 1) < 4 * se and se < 0.01, (mean, se)
    assert result.acceptance.min() > 0.5


def unbiasedness(transition: str, **kwargs) -> tuple[float, float]:
    """Mean and standard error of w / p(x) for AIS from a widened encoder on the linear model (T = 10,
    200 chains). Step 0.3: acceptance near 0.9, so that the Metropolis step matters."""
    vae, exact, x = linear_model(seed=3)
    set_encoder_to_posterior(vae, exact, widen=2.0)
    options = dict(n_steps=10, n_chains=200, start="encoder", transition=transition, n_leapfrog=3,
                   step_size=0.3, target_acceptance=None, seed=2) | kwargs
    result = ais_log_likelihood(vae, x, **options)
    return mean_and_se(torch.exp(result.log_weights - exact.log_marginal(x)))


def _accept_every_proposal(z, z_new, log_ratio, old, new):
    return z_new, torch.ones_like(log_ratio), new


def _mala_without_proposal_correction(z, log_density, step_size, current=None):
    log_f, grad = log_density(z) if current is None else current
    eps = step_size.unsqueeze(-1)
    z_new = z + 0.5 * eps**2 * grad + eps * torch.randn_like(z)
    log_f_new, grad_new = log_density(z_new)
    return vaelib.ais._metropolis(z, z_new, log_f_new - log_f, (log_f, grad), (log_f_new, grad_new))


_increment = vaelib.ais._log_weight_increment
MUTANTS = {
    "wrong sign": ("_log_weight_increment", lambda t0, t1, joint, start: -_increment(t0, t1, joint, start)),
    "no tau_t - tau_(t-1)": ("_log_weight_increment", lambda t0, t1, joint, start: (joint - start).double()),
    "no Metropolis step": ("_metropolis", _accept_every_proposal),
    "MALA without proposal correction": ("mala_step", _mala_without_proposal_correction),
}


@pytest.mark.parametrize("transition", ["hmc", "mala"])
def test_unbiasedness_check_passes_on_the_real_code(transition):
    mean, se = unbiasedness(transition)
    assert abs(mean - 1) < 4 * se and se < 0.01, (mean, se)


@pytest.mark.parametrize("mutant", MUTANTS)
@pytest.mark.parametrize("transition", ["hmc", "mala"])
def test_unbiasedness_check_rejects_a_planted_error(transition, mutant, monkeypatch):
    """The check above, on AIS with one error planted: it must fail (by many standard errors)."""
    name, replacement = MUTANTS[mutant]
    if name == "mala_step" and transition == "hmc":
        pytest.skip("MALA's proposal correction is not used by HMC")
    monkeypatch.setattr(vaelib.ais, name, replacement)
    mean, se = unbiasedness(transition)
    assert not (abs(mean - 1) < 4 * se and se < 0.01), (mean, se)


def test_pilot_adaptation_keeps_the_weights_unbiased():
    """The default: steps adapted on a pilot run, then frozen. Start far from the target acceptance so that the
    adaptation moves the steps a lot; the main run's weights stay unbiased."""
    mean, se = unbiasedness("hmc", n_steps=60, n_chains=100, step_size=0.02, target_acceptance=0.65)
    assert abs(mean - 1) < 4 * se and se < 0.02, (mean, se)
    vae, exact, x = linear_model(seed=3)
    result = ais_log_likelihood(vae, x[:4], n_steps=60, n_chains=8, step_size=0.02, seed=0)
    assert result.step_sizes.shape == (59, 4) and result.step_sizes[-1].min() > 0.02 * 1.02**10
    # Frozen steps given back reproduce a run that uses them (no adaptation of its own).
    again = ais_log_likelihood(vae, x[:4], n_steps=60, n_chains=8, step_size=result.step_sizes,
                               target_acceptance=None, seed=0)
    torch.testing.assert_close(again.step_sizes, result.step_sizes)


def test_bdmc_sandwiches_the_exact_log_likelihood():
    """Forward AIS <= log p(x) <= reverse AIS from the exact posterior draw (each within 4 standard errors);
    the sandwich narrows as T grows."""
    vae, exact, _ = linear_model(seed=5)
    set_encoder_to_posterior(vae, exact, widen=4.0)
    g = torch.Generator().manual_seed(50)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x = z @ exact.W.T + exact.b + exact.sigma * torch.randn(64, 6, generator=g, dtype=torch.float64)
    log_p = exact.log_marginal(x)
    widths = {}
    for n_steps in (2, 50):
        result = bdmc(vae, x, z, n_steps=n_steps, n_chains=4, n_leapfrog=3, step_size=0.1, seed=51)
        below, below_se = mean_and_se(result.forward.log_px - log_p)
        above, above_se = mean_and_se(result.reverse.log_px - log_p)
        assert below < 4 * below_se and above > -4 * above_se, (n_steps, below, above)
        widths[n_steps] = result.width.mean().item()
    assert widths[50] < widths[2] / 3 and widths[50] < 0.05, widths


def gaussian_target(dim: int = 3, seed: int = 0):
    """A correlated Gaussian N(m, S) as a LogDensity, with m and S."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, generator=g, dtype=torch.float64)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.3 * torch.eye(dim, dtype=torch.float64)
    prec = torch.linalg.inv(cov)

    def log_density(z):
        r = z - m
        return -0.5 * ((r @ prec) * r).sum(-1), -(r @ prec)
    return log_density, m, cov


@pytest.mark.parametrize("transition", ["hmc", "mala"])
def test_transition_leaves_a_gaussian_invariant(transition):
    log_density, m, cov = gaussian_target()
    torch.manual_seed(0)
    n = 20_000
    z = m + torch.randn(n, 3, dtype=torch.float64) @ torch.linalg.cholesky(cov).T  # exact draws
    step = torch.full((n,), 1.0 if transition == "hmc" else 0.9, dtype=torch.float64)
    accepted = []
    for _ in range(5):
        if transition == "hmc":
            z, acc, _ = hmc_step(z, log_density, step, n_leapfrog=4)
        else:
            z, acc, _ = mala_step(z, log_density, step)
        accepted.append(acc.mean().item())
    # Large steps: many rejections, so a wrong acceptance rule would show.
    assert 0.2 < min(accepted) and max(accepted) < 0.9, accepted
    for i in range(3):
        mean, se = mean_and_se(z[:, i])
        assert abs(mean - m[i].item()) < 4 * se, (i, mean, m[i])
        for j in range(i, 3):
            centred = (z[:, i] - m[i]) * (z[:, j] - m[j])
            value, se = mean_and_se(centred)
            assert abs(value - cov[i, j].item()) < 4 * se, (i, j, value, cov[i, j])


def test_mala_is_hmc_with_one_leapfrog_step():
    log_density, m, _ = gaussian_target(seed=1)
    z0 = m + torch.randn(500, 3, dtype=torch.float64)
    step = torch.full((500,), 0.8, dtype=torch.float64)
    torch.manual_seed(4)
    z_hmc, acc_hmc, _ = hmc_step(z0, log_density, step, n_leapfrog=1)
    torch.manual_seed(4)
    z_mala, acc_mala, _ = mala_step(z0, log_density, step)
    assert 0.1 < acc_hmc.mean() < 0.95
    torch.testing.assert_close(acc_hmc, acc_mala, rtol=0, atol=0)
    torch.testing.assert_close(z_hmc, z_mala, rtol=1e-12, atol=1e-12)


def test_nonlinear_model_batches_without_parameter_gradients():
    torch.manual_seed(0)
    vae = build_vae(arch="burda", input_dim=20, latent_dim=3, hidden=(16,))
    x = torch.bernoulli(torch.full((10, 20), 0.3))
    whole = ais_log_likelihood(vae, x, n_steps=5, n_chains=4, n_leapfrog=2, seed=0)
    assert whole.log_px.shape == (10,) and whole.log_weights.shape == (4, 10)
    assert torch.isfinite(whole.log_px).all()
    assert all(p.grad is None for p in vae.parameters())
    ess = whole.ess
    assert (ess >= 1 - 1e-9).all() and (ess <= 4 + 1e-9).all()
    again = ais_log_likelihood(vae, x, n_steps=5, n_chains=4, n_leapfrog=2, seed=0)
    torch.testing.assert_close(whole.log_px, again.log_px)  # the seed decides the draws
    prior_start = ais_log_likelihood(vae, x, n_steps=5, n_chains=4, start="prior", transition="mala",
                                     batch_size=3, seed=0)
    assert prior_start.log_px.shape == (10,) and prior_start.acceptance.shape == (4,)


def test_effective_sample_size_of_known_weights():
    log_w = torch.log(torch.tensor([[1.0, 1.0], [1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(effective_sample_size(log_w), torch.tensor([16 / 6, 1.0]))


def test_schedules_run_from_zero_to_one():
    for kind in ("sigmoidal", "geometric", "linear"):
        taus = annealing_schedule(50, kind)
        assert taus[0] == 0 and taus[-1] == 1 and len(taus) == 51
        assert (taus[1:] > taus[:-1]).all(), kind
    torch.testing.assert_close(annealing_schedule(1, "sigmoidal"), torch.tensor([0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [dict(n_steps=0), dict(n_chains=0), dict(start="posterior"),
                                    dict(transition="gibbs"), dict(step_size=-1.0), dict(schedule="cosine"),
                                    dict(schedule=[0.0, 0.5, 0.4, 1.0], n_steps=3), dict(target_acceptance=1.5),
                                    dict(adaptation="never"), dict(pilot_chains=0),
                                    dict(step_size=torch.full((3,), 0.1), n_steps=3),
                                    dict(step_size=torch.full((5,), 0.1), n_steps=3, target_acceptance=None)])
def test_bad_arguments_are_refused(kwargs):
    vae, _, x = linear_model()
    with pytest.raises(ValueError):
        ais_log_likelihood(vae, x[:2], **kwargs)
