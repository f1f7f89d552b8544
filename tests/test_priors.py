"""Chapter 13's vaelib: full-Gaussian closed forms, the VampPrior, the KL dispatch, IWAE training and its CLI.

Every check compares with an independent route: torch.distributions (full-Gaussian KL and entropy, the VampPrior
as a MixtureSameFamily), the mixture's moments computed from its components (sampling), the ELBO path with a
Monte-Carlo KL (IWAE with k = 1), the self-normalised importance-weighted gradient written out by hand (IWAE
gradient).
"""

import json

import pytest
import torch
from helpers import GraphLogicOnCPU, needs_data
from torch import distributions as td

import vaelib.training as training
from vaelib.cli import main
from vaelib.distributions import entropy_full_normal, kl_full_normal
from vaelib.models import StandardNormalPrior, VampPrior, build_vae
from vaelib.objectives import default_kl, elbo, log_importance_weights
from vaelib.runs import RunMismatchError, load_run
from vaelib.training import fit


def tiny_vamp(seed=0, pseudo_inputs=5, **kw):
    torch.manual_seed(seed)
    return build_vae(latent_dim=3, hidden=(16,), prior="vamp", pseudo_inputs=pseudo_inputs, **kw)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 784, generator=g)
    x = protos[torch.randint(0, 4, (96,), generator=g)] * 0.8 + 0.2 * torch.rand(96, 784, generator=g)
    return x[:64], x[64:]


# --- closed forms for full Gaussians ------------------------------------------------------------------------
def _random_spd(gen, batch, dim):
    a = torch.randn(*batch, dim, dim, generator=gen, dtype=torch.float64)
    return a @ a.transpose(-1, -2) + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_full_normal_kl_and_entropy_match_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mu_q, mu_p = (torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    cov_q, cov_p = _random_spd(gen, (4,), 3), _random_spd(gen, (4,), 3)
    q = td.MultivariateNormal(mu_q, covariance_matrix=cov_q)
    p = td.MultivariateNormal(mu_p, covariance_matrix=cov_p)
    torch.testing.assert_close(kl_full_normal(mu_q, cov_q, mu_p, cov_p), td.kl_divergence(q, p), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(entropy_full_normal(cov_q), q.entropy(), rtol=1e-12, atol=1e-12)
    # KL(q || q) = 0, and the argument order matters (KL is not symmetric).
    torch.testing.assert_close(kl_full_normal(mu_q, cov_q, mu_q, cov_q), torch.zeros(4, dtype=torch.float64))
    assert not torch.allclose(kl_full_normal(mu_q, cov_q, mu_p, cov_p), kl_full_normal(mu_p, cov_p, mu_q, cov_q))


# --- the VampPrior ------------------------------------------------------------------------------------------
def _mixture(model):
    """The VampPrior built independently: torch's MixtureSameFamily of the encoder's Gaussians at the
    pseudo-inputs, with uniform weights."""
    with torch.no_grad():
        mu, log_var = model.encoder(model.prior.pseudo_inputs)
    weights = td.Categorical(logits=torch.zeros(len(mu), dtype=mu.dtype))
    return td.MixtureSameFamily(weights, td.Independent(td.Normal(mu, torch.exp(0.5 * log_var)), 1)), mu, log_var


@pytest.mark.parametrize("max_elements", [VampPrior.MAX_ELEMENTS, 7])  # one slice; many slices of rows
def test_vamp_log_prob_is_the_mixture_density(monkeypatch, max_elements):
    monkeypatch.setattr(VampPrior, "MAX_ELEMENTS", max_elements)
    model = tiny_vamp().double()
    mixture, _, _ = _mixture(model)
    z = 2.0 * torch.randn(6, 4, 3, dtype=torch.float64)  # (k, batch, D), as in the IWAE bound
    torch.testing.assert_close(model.prior.log_prob(z), mixture.log_prob(z), rtol=1e-12, atol=1e-12)


def test_vamp_log_prob_with_a_full_covariance_encoder_is_the_mixture_density():
    torch.manual_seed(0)
    model = build_vae(latent_dim=3, hidden=(16,), prior="vamp", pseudo_inputs=4, posterior="full").double()
    with torch.no_grad():
        model.encoder.lower_head.bias.normal_()  # correlated components
        stats = model.encoder(model.prior.pseudo_inputs)
    scale_tril = model.encoder.scale_tril(stats)
    mixture = td.MixtureSameFamily(td.Categorical(logits=torch.zeros(4, dtype=torch.float64)),
                                   td.MultivariateNormal(stats[0], scale_tril=scale_tril))
    z = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(model.prior.log_prob(z), mixture.log_prob(z), rtol=1e-12, atol=1e-12)
    assert model.prior.sample(7, generator=torch.Generator().manual_seed(0)).shape == (7, 3)


def test_vamp_log_prob_reaches_pseudo_inputs_and_encoder():
    model = tiny_vamp()
    model.prior.log_prob(torch.randn(8, 3)).sum().backward()
    assert model.prior.pseudo_inputs.grad.abs().sum() > 0
    assert model.encoder.head.weight.grad.abs().sum() > 0


def test_vamp_samples_have_the_mixture_moments():
    model = tiny_vamp().double()
    _, mu, log_var = _mixture(model)
    n = 40_000
    z = model.prior.sample(n, generator=torch.Generator().manual_seed(3))
    # Mixture moments from the components: E z = mean_c mu_c, E z^2 = mean_c (sigma_c^2 + mu_c^2).
    mean = mu.mean(0)
    second = (torch.exp(log_var) + mu.pow(2)).mean(0)
    for estimate, target, draws in ((z.mean(0), mean, z), (z.pow(2).mean(0), second, z.pow(2))):
        se = draws.std(0) / n**0.5
        assert ((estimate - target).abs() < 4 * se).all(), (estimate, target, se)
    # The generator alone decides the draws; without one, the global RNG does (same moments).
    again = model.prior.sample(n, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, z, rtol=0, atol=0)
    torch.manual_seed(4)
    z = model.prior.sample(n)
    assert ((z.pow(2).mean(0) - second).abs() < 4 * z.pow(2).std(0) / n**0.5).all()


def test_vamp_samples_use_every_component_equally_often():
    """Components far apart and narrow (pseudo-inputs = distinct random images, sigma ~ 0.02), so each draw's
    nearest component mean names its component; each count ~ Binomial(n, 1/C), within 4 standard errors."""
    model = tiny_vamp(pseudo_inputs=6).double()
    with torch.no_grad():
        model.prior.pseudo_inputs.copy_(torch.rand(6, 784, dtype=torch.float64))
        model.encoder.head.bias[3:] = -8.0
        model.encoder.head.weight[:3] *= 50.0  # spread the means
    _, mu, log_var = _mixture(model)
    assert torch.cdist(mu, mu).add(torch.eye(6, dtype=torch.float64) * 1e9).min() > 20 * log_var.exp().sqrt().max()
    n, c = 30_000, 6
    z = model.prior.sample(n, generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(torch.cdist(z, mu).argmin(1), minlength=c).double()
    se = (n * (1 / c) * (1 - 1 / c)) ** 0.5
    assert ((counts - n / c).abs() < 4 * se).all(), counts


def test_vamp_is_registered_once_and_survives_save_load(tmp_path, data):
    model = tiny_vamp()
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    keys = list(model.state_dict())
    assert "prior.pseudo_inputs" in keys and not any(k.startswith("prior.encoder") for k in keys)
    assert model.prior.encoder is model.encoder
    assert model.to(torch.float64).prior.pseudo_inputs.dtype == torch.float64
    model.float()
    result = fit(model, data[0], epochs=1, batch_size=32, progress=False, out_dir=tmp_path / "run")
    assert result.history[0]["train_kl"] == pytest.approx(result.history[0]["train_kl"])  # ran, finite
    loaded = load_run(tmp_path / "run")
    assert loaded.config["prior"] == "vamp" and loaded.config["pseudo_inputs"] == 5
    assert loaded.model.prior.encoder is loaded.model.encoder
    z = torch.randn(10, 3)
    torch.testing.assert_close(loaded.model.prior.log_prob(z), model.prior.log_prob(z))
    rebuilt = build_vae(**model.config)
    assert isinstance(rebuilt.prior, VampPrior) and rebuilt.prior.n_components == 5


def test_build_vae_prior_arguments():
    assert isinstance(build_vae(latent_dim=2, hidden=8).prior, StandardNormalPrior)
    assert "prior" not in build_vae(latent_dim=2, hidden=8).config  # old runs' configs are unchanged
    with pytest.raises(ValueError, match="unknown prior"):
        build_vae(prior="flow")
    with pytest.raises(ValueError, match="pseudo_inputs"):
        build_vae(prior="vamp", pseudo_inputs=0)


# --- the KL dispatch ------------------------------------------------------------------------------------------
def test_analytic_kl_with_a_vamp_prior_is_one_clear_value_error(data):
    model = tiny_vamp()
    with pytest.raises(ValueError, match="no closed-form KL.*kl='mc'"):
        elbo(model, data[0][:4], kl="analytic")
    with pytest.raises(ValueError, match="kl='mc'"):
        fit(model, data[0], epochs=1, kl="analytic", progress=False)
    assert default_kl(model) == "mc" and default_kl(build_vae(latent_dim=2, hidden=8)) == "analytic"


def test_elbo_prefers_the_encoders_own_kl_to_the_standard_normal():
    model = build_vae(latent_dim=2, hidden=8)
    marker = torch.full((3,), 123.0)
    model.encoder.kl_to_standard_normal = lambda stats: marker
    assert torch.equal(elbo(model, torch.rand(3, 784)).kl, marker)


# --- IWAE training --------------------------------------------------------------------------------------------
def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_iwae_with_k_1_trains_exactly_like_the_elbo_with_a_monte_carlo_kl(data):
    """log w = log p(x|z) + log p(z) - log q(z|x) for one z is the ELBO's rec - (log q - log p) for the same z;
    the same seed draws the same z, so the two runs agree to float rounding. The analytic-KL ELBO has the same
    expectation but other per-sample values, and its run differs (what this test could otherwise not tell)."""
    runs = {}
    settings = {"iwae1": dict(objective="iwae", k=1), "mc": dict(kl="mc"), "analytic": dict(kl="analytic")}
    for name, kw in settings.items():
        torch.manual_seed(0)
        model = build_vae(latent_dim=2, hidden=(16,))
        result = fit(model, data[0], data[1], epochs=3, batch_size=16, progress=False, **kw)
        runs[name] = (_params(model), result.history)
    torch.testing.assert_close(runs["iwae1"][0], runs["mc"][0], rtol=1e-5, atol=1e-6)
    iwae_loss = [row["train_loss"] for row in runs["iwae1"][1]]
    assert iwae_loss == pytest.approx([row["train_loss"] for row in runs["mc"][1]], rel=1e-6)
    assert not torch.allclose(runs["iwae1"][0], runs["analytic"][0], rtol=1e-5, atol=1e-6)


def test_iwae_loss_gradient_is_the_self_normalised_importance_weighted_gradient():
    """grad L_k = sum_i w~_i grad log w_i with w~ = softmax(log w) held fixed (Burda et al. 2015); the ELBO's
    gradient, the plain average of grad log w_i, is a different vector (the test can tell them apart)."""
    torch.manual_seed(0)
    model = build_vae(latent_dim=2, hidden=(8,), prior="vamp", pseudo_inputs=3).double()
    x = torch.rand(4, 784, dtype=torch.float64)
    k = 7

    def grad_of(loss_fn):
        model.zero_grad()
        torch.manual_seed(11)
        loss_fn().backward()
        return _params_grad(model)

    iwae = grad_of(lambda: training._batch_loss(model, x, 1.0, "mc", objective="iwae", k=k)[0])

    def self_normalised():
        log_w = log_importance_weights(model, x, k)
        return -(torch.softmax(log_w.detach(), dim=0) * log_w).sum(0).mean()

    def plain_average():
        return -log_importance_weights(model, x, k).mean(0).mean()

    torch.testing.assert_close(iwae, grad_of(self_normalised), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(iwae, grad_of(plain_average), rtol=1e-3, atol=1e-6)
    # And the loss is the bound, -mean_x log (1/k) sum_i w_i, with the same draws, written out.
    torch.manual_seed(11)
    loss = training._batch_loss(model, x, 1.0, "mc", objective="iwae", k=k)[0]
    torch.manual_seed(11)
    w = log_importance_weights(model, x, k).exp()
    torch.testing.assert_close(loss, -w.mean(0).log().mean())


def _params_grad(model):
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                      for p in model.parameters()])


@pytest.mark.parametrize("bad", [dict(objective="iwae"), dict(objective="iwae", k=0), dict(k=5),
                                 dict(objective="iwae", k=2, beta=0.5), dict(objective="vi")])
def test_fit_refuses_bad_objective_settings(data, bad):
    with pytest.raises(ValueError):
        fit(build_vae(latent_dim=2, hidden=8), data[0], epochs=1, progress=False, **bad)


def test_iwae_run_records_its_objective_and_refuses_another_on_resume(tmp_path, data):
    out = tmp_path / "run"
    fit(tiny_vamp(), data[0], epochs=1, batch_size=32, progress=False, out_dir=out, objective="iwae", k=2)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["objective"] == "iwae" and settings["k"] == 2 and settings["kl"] == "mc"
    history = json.loads((out / "history.json").read_text())
    assert "train_iwae_bound" in history[0] and "train_kl" not in history[0]
    for other in (dict(objective="iwae", k=3), dict()):
        with pytest.raises(RunMismatchError, match="objective|k is"):
            fit(tiny_vamp(), data[0], epochs=2, batch_size=32, progress=False, out_dir=out, resume=True, **other)
    result = fit(tiny_vamp(), data[0], epochs=2, batch_size=32, progress=False, out_dir=out, resume=True,
                 objective="iwae", k=2)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_graph_path_trains_iwae_with_a_vamp_prior_like_eager(monkeypatch, data):
    """The IWAE loss and the VampPrior are plain tensor code, so the graph path runs them (no fallback): its
    step logic, checked on the CPU with the CUDA calls stubbed, gives eager's parameters."""
    assert training.graph_safe(tiny_vamp())
    eager = tiny_vamp()
    fit(eager, data[0], epochs=2, batch_size=16, progress=False, objective="iwae", k=3, fast="eager")
    monkeypatch.setattr(training, "GraphStepper", GraphLogicOnCPU)
    monkeypatch.setattr(training, "_resolve_fast", lambda fast, *args: "graph")
    graph = tiny_vamp()
    result = fit(graph, data[0], epochs=2, batch_size=16, progress=False, objective="iwae", k=3)
    assert result.fast == "graph"
    torch.testing.assert_close(_params(graph), _params(eager), rtol=1e-5, atol=1e-6)


# --- CLI ------------------------------------------------------------------------------------------------------
TINY = ["--dataset", "fashion-mnist", "--latent", "2", "--hidden", "16", "--train-size", "128", "--test-size", "32",
        "--batch-size", "64", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("extra, words", [
    (["--k", "5"], "--k"),
    (["--objective", "iwae"], "--objective iwae needs --k"),
    (["--pseudo-inputs", "10"], "--prior vamp"),
    (["--prior", "vamp", "--kl", "analytic"], "closed-form KL"),
    (["--objective", "iwae", "--k", "3", "--beta", "0.5"], "no KL weight"),
])
def test_train_refuses_bad_combinations_in_one_line(tmp_path, capsys, extra, words):
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("extra", [["--k", "0"], ["--objective", "iwae", "--k", "-1"], ["--prior", "flow"],
                                   ["--pseudo-inputs", "0"]])
def test_train_bad_values_exit_2(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "r"), *extra])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@needs_data
def test_train_vamp_iwae_round_trip_and_resume_refusal(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "1", "--prior", "vamp", "--pseudo-inputs", "8", "--objective", "iwae",
            "--k", "3", "--out", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model_config"]["prior"] == "vamp" and run["model_config"]["pseudo_inputs"] == 8
    assert run["settings"]["objective"] == "iwae" and run["settings"]["k"] == 3 and run["settings"]["kl"] == "mc"
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--k", "4", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--k 4" in err
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2]


def test_eval_scores_vamp_and_full_covariance_runs(tmp_path, capsys):
    """`vaelib eval` on a VampPrior run and on a full-covariance run: the ELBO with the model's own KL estimator
    (Monte Carlo for the VampPrior), no per-dimension KL where the KL does not split per dimension."""
    for name, extra in (("vamp", ["--prior", "vamp", "--pseudo-inputs", "8"]), ("full", ["--posterior", "full"])):
        out = tmp_path / name
        assert main(["train", *TINY, "--epochs", "1", *extra, "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["eval", str(out), "--iwae-k", "0"]) == 0, capsys.readouterr().err
        results = json.loads((out / "eval.json").read_text())
        assert results["kl_per_dimension"] is None
        assert results["test_kl"] > 0 and results["test_elbo"] < 0

