"""vaelib.distributions against SymPy (evaluated in 50-digit mpmath) and torch.distributions.

Inputs are random and include the extremes the book relies on: sigma from 1e-4 to 1e4, |mu| up to 1e3,
logits up to +-1e4. Errors are measured against the *scale* of the terms being summed (sum of their absolute
values), the quantity floating-point error is proportional to; a result that is tiny because large terms
cancel (a KL near 0) is still held to rounding error of those terms, which a naive exp(s) - 1 - s would fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mpmath
import numpy as np
import pytest
import sympy as sp
import torch
from torch import distributions as td

from vaelib.distributions import (
    kl_normal_normal,
    kl_normal_std_normal,
    log_bernoulli,
    log_continuous_bernoulli,
    log_normal_diag,
    log_standard_normal,
)

DTYPES = [torch.float32, torch.float64]
# Error allowed per unit of term scale: a few hundred ulps of float32, a few thousand of float64.
REL_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
N_ROWS, DIM = 24, 4
mpmath.mp.dps = 50

# --- SymPy references: one scalar term per dimension, written from the textbook definitions. --------------
x, mu, z, logit = sp.symbols("x mu z l", real=True)
sigma, sigma_q, sigma_p = sp.symbols("sigma sigma_q sigma_p", positive=True)
mu_q, mu_p = sp.symbols("mu_q mu_p", real=True)
lam = 1 / (1 + sp.exp(-logit))

NORMAL_TERM = sp.log(1 / sp.sqrt(2 * sp.pi * sigma**2) * sp.exp(-((x - mu) ** 2) / (2 * sigma**2)))
STD_NORMAL_TERM = NORMAL_TERM.subs({x: z, mu: 0, sigma: 1})
# log sigmoid(l) = -log(1 + e^-l) and log(1 - sigmoid(l)) = -log(1 + e^l): the same function, written so
# that 50-digit arithmetic does not round 1 - sigmoid(1e4) to 0 (checked symbolically below).
BERNOULLI_TERM = -x * sp.log(1 + sp.exp(-logit)) - (1 - x) * sp.log(1 + sp.exp(logit))
CB_NORM_GENERIC = sp.log(2 * sp.atanh(1 - 2 * lam) / (1 - 2 * lam))  # Loaiza-Ganem & Cunningham (2019)
CB_NORM = sp.Piecewise((sp.log(2), sp.Eq(logit, 0)), (CB_NORM_GENERIC, True))  # its limit at lambda = 1/2
KL_TERM = sp.log(sigma_p / sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - sp.Rational(1, 2)


def _mp(expr: sp.Expr, symbols: tuple[sp.Symbol, ...]) -> Callable[..., mpmath.mpf]:
    return sp.lambdify(symbols, expr, modules="mpmath")


def _reference(fn: Callable[..., mpmath.mpf], *arrays: np.ndarray) -> np.ndarray:
    """Apply a scalar mpmath function elementwise and sum over the last dim, in 50 digits."""
    flat = [a.reshape(-1, a.shape[-1]) for a in np.broadcast_arrays(*arrays)]
    out = []
    for row in zip(*flat, strict=True):
        terms = (fn(*(mpmath.mpf(float(v)) for v in vals)) for vals in zip(*row, strict=True))
        out.append(float(mpmath.fsum(terms)))
    return np.array(out).reshape(np.broadcast_shapes(*(a.shape for a in arrays))[:-1])


def _assert_close_scaled(got: torch.Tensor, ref: np.ndarray, scale: np.ndarray, dtype: torch.dtype) -> None:
    assert torch.isfinite(got).all(), got
    err = np.abs(got.double().numpy() - ref)
    bound = REL_TOL[dtype] * (1.0 + scale)
    assert (err <= bound).all(), f"max err/bound {np.max(err / bound):.3g}"


def _as(dtype: torch.dtype, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Tensors of the dtype under test; the reference then uses exactly these (rounded) values."""
    return tuple(torch.as_tensor(a).to(dtype) for a in arrays)


def _exact(*tensors: torch.Tensor) -> tuple[np.ndarray, ...]:
    return tuple(t.double().numpy() for t in tensors)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _extreme_gaussian_inputs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mu, log_var) of shape (N, D): sigma log-uniform on [1e-4, 1e4], |mu| <= 1e3, x near or far."""
    shape = (N_ROWS, DIM)
    log_sigma = rng.uniform(math.log(1e-4), math.log(1e4), shape)
    log_sigma[0] = math.log(1e-4)
    log_sigma[1] = math.log(1e4)
    mu_ = rng.uniform(-1e3, 1e3, shape)
    near = mu_ + np.exp(log_sigma) * rng.standard_normal(shape)
    far = rng.uniform(-1e3, 1e3, shape)
    x_ = np.where(rng.random(shape) < 0.5, near, far)
    return x_, mu_, 2 * log_sigma


# --- the references themselves ---------------------------------------------------------------------------
def test_sympy_references_are_the_textbook_forms() -> None:
    naive_bernoulli = x * sp.log(lam) + (1 - x) * sp.log(1 - lam)
    diff = (naive_bernoulli - BERNOULLI_TERM).subs(x, sp.Rational(3, 10))
    for val in (-7, -1, 0, 2, 9):
        assert abs(sp.N(diff.subs(logit, val), 30)) < 1e-25
    # The continuous-Bernoulli normaliser tends to 2 at lambda = 1/2 (logit 0).
    assert sp.simplify(sp.limit(sp.exp(CB_NORM_GENERIC), logit, 0) - 2) == 0
    # The Gaussian log-density is the form vaelib uses: -1/2 [log 2 pi + log sigma^2 + (x-mu)^2/sigma^2].
    expected = -sp.Rational(1, 2) * (sp.log(2 * sp.pi) + sp.log(sigma**2) + (x - mu) ** 2 / sigma**2)
    assert sp.simplify(sp.expand_log(NORMAL_TERM - expected, force=True)) == 0


# --- Gaussians ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_normal_diag_matches_sympy(rng: np.random.Generator, dtype: torch.dtype) -> None:
    xt, mut, lvt = _as(dtype, *_extreme_gaussian_inputs(rng))
    xs, mus, lvs = _exact(xt, mut, lvt)
    ref = _reference(_mp(NORMAL_TERM, (x, mu, sigma)), xs, mus, np.exp(0.5 * lvs))
    scale = 0.5 * (math.log(2 * math.pi) + np.abs(lvs) + (xs - mus) ** 2 * np.exp(-lvs)).sum(-1)
    _assert_close_scaled(log_normal_diag(xt, mut, lvt), ref, scale, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_normal_diag_matches_torch_normal(rng: np.random.Generator, dtype: torch.dtype) -> None:
    xt, mut, lvt = _as(dtype, *_extreme_gaussian_inputs(rng))
    got = log_normal_diag(xt, mut, lvt)
    xt, mut, lvt = xt.double(), mut.double(), lvt.double()  # the rounded inputs, evaluated in float64
    expected = td.Normal(mut, torch.exp(0.5 * lvt)).log_prob(xt).sum(-1)
    assert got.dtype == dtype
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_standard_normal(rng: np.random.Generator, dtype: torch.dtype) -> None:
    (zt,) = _as(dtype, rng.uniform(-1e3, 1e3, (N_ROWS, DIM)) * rng.random((N_ROWS, 1)))
    (zs,) = _exact(zt)
    ref = _reference(_mp(STD_NORMAL_TERM, (z,)), zs)
    scale = 0.5 * (zs**2 + math.log(2 * math.pi)).sum(-1)
    _assert_close_scaled(log_standard_normal(zt), ref, scale, dtype)
    zero_var = torch.zeros_like(zt)
    torch.testing.assert_close(log_standard_normal(zt), log_normal_diag(zt, zero_var, zero_var))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_normal_normal_matches_sympy_and_torch(rng: np.random.Generator, dtype: torch.dtype) -> None:
    _, mq, lvq = _extreme_gaussian_inputs(rng)
    _, mp_, lvp = _extreme_gaussian_inputs(rng)
    # Rows where q is p up to a tiny perturbation: the KL is ~0 from cancelling terms.
    mp_[2:4], lvp[2:4] = mq[2:4] + 1e-6 * np.exp(0.5 * lvq[2:4]), lvq[2:4] + 1e-7
    mqt, lvqt, mpt, lvpt = _as(dtype, mq, lvq, mp_, lvp)
    mqs, lvqs, mps, lvps = _exact(mqt, lvqt, mpt, lvpt)
    kl_fn = _mp(KL_TERM, (mu_q, sigma_q, mu_p, sigma_p))
    ref = _reference(kl_fn, mqs, np.exp(0.5 * lvqs), mps, np.exp(0.5 * lvps))
    ratio = lvqs - lvps
    scale = 0.5 * (np.abs(np.expm1(ratio)) + np.abs(ratio) + (mqs - mps) ** 2 * np.exp(-lvps)).sum(-1)
    got = kl_normal_normal(mqt, lvqt, mpt, lvpt)
    _assert_close_scaled(got, ref, scale, dtype)
    assert (got >= 0).all()
    if dtype == torch.float64:
        expected = td.kl_divergence(
            td.Normal(mqt, torch.exp(0.5 * lvqt)), td.Normal(mpt, torch.exp(0.5 * lvpt))
        ).sum(-1)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * (1 + float(scale.max())))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_normal_std_normal_matches_sympy(rng: np.random.Generator, dtype: torch.dtype) -> None:
    _, mq, lvq = _extreme_gaussian_inputs(rng)
    lvq[2] = rng.uniform(-1e-9, 1e-9, DIM)  # sigma ~ 1: sigma^2 - 1 - log sigma^2 cancels to ~1e-19
    mq[2] = 1e-9
    mqt, lvqt = _as(dtype, mq, lvq)
    mqs, lvqs = _exact(mqt, lvqt)
    kl_std = KL_TERM.subs({mu_p: 0, sigma_p: 1})
    ref = _reference(_mp(kl_std, (mu_q, sigma_q)), mqs, np.exp(0.5 * lvqs))
    scale = 0.5 * (mqs**2 + np.abs(np.expm1(lvqs)) + np.abs(lvqs)).sum(-1)
    got = kl_normal_std_normal(mqt, lvqt)
    _assert_close_scaled(got, ref, scale, dtype)
    zero = torch.zeros_like(mqt)
    torch.testing.assert_close(got, kl_normal_normal(mqt, lvqt, zero, zero))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_is_zero_between_equal_gaussians(rng: np.random.Generator, dtype: torch.dtype) -> None:
    _, mq, lvq = _extreme_gaussian_inputs(rng)
    mqt, lvqt = _as(dtype, mq, lvq)
    assert (kl_normal_normal(mqt, lvqt, mqt, lvqt) == 0).all()
    assert (kl_normal_std_normal(torch.zeros_like(mqt), torch.zeros_like(lvqt)) == 0).all()


# --- Bernoulli and continuous Bernoulli ---------------------------------------------------------------------
def _logits(rng: np.random.Generator) -> np.ndarray:
    """Logits spanning saturation (+-1e4), ordinary values and the neighbourhood of 0 (lambda ~ 1/2)."""
    magnitude = np.exp(rng.uniform(math.log(1e-6), math.log(1e4), (N_ROWS, DIM)))
    out = rng.choice([-1.0, 1.0], (N_ROWS, DIM)) * magnitude
    out[0] = [1e4, -1e4, 1e-2, -1e-2 - 1e-9]  # saturation and both sides of the Taylor switch
    out[1] = [0.0, 5e-3, 30.0, -30.0]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grey", [False, True])
def test_log_bernoulli_matches_sympy_and_torch(
    rng: np.random.Generator, dtype: torch.dtype, grey: bool
) -> None:
    xv = rng.random((N_ROWS, DIM)) if grey else (rng.random((N_ROWS, DIM)) < 0.5).astype(float)
    xt, lt = _as(dtype, xv, _logits(rng))
    xs, ls = _exact(xt, lt)
    ref = _reference(_mp(BERNOULLI_TERM, (x, logit)), xs, ls)
    scale = (np.abs(ls) + math.log(2)).sum(-1)
    got = log_bernoulli(xt, lt)
    _assert_close_scaled(got, ref, scale, dtype)
    if not grey and dtype == torch.float64:
        expected = td.Bernoulli(logits=lt).log_prob(xt).sum(-1)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_continuous_bernoulli_matches_sympy(rng: np.random.Generator, dtype: torch.dtype) -> None:
    logits = _logits(rng)
    logits = np.clip(logits, -80, 80)  # 50 digits resolve 1 - 2 lambda only for |l| <~ 110
    xt, lt = _as(dtype, rng.random((N_ROWS, DIM)), logits)
    xs, ls = _exact(xt, lt)
    ref = _reference(_mp(BERNOULLI_TERM + CB_NORM, (x, logit)), xs, ls)
    scale = (np.abs(ls) + 2 * math.log(2) + np.log1p(np.abs(ls))).sum(-1)
    got = log_continuous_bernoulli(xt, lt)
    _assert_close_scaled(got, ref, scale, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_continuous_bernoulli_matches_torch(rng: np.random.Generator, dtype: torch.dtype) -> None:
    # torch is the reference only where it is accurate itself: it clamps probabilities near 0 and 1 (so
    # |logits| > ~15 are off) and uses a coarser Taylor expansion for lambda in (0.499, 0.501).
    logits = np.clip(_logits(rng), -12.0, 12.0)
    logits = np.where(np.abs(logits) < 0.01, 0.5, logits)
    xt, lt = _as(dtype, rng.random((N_ROWS, DIM)), logits)
    got = log_continuous_bernoulli(xt, lt)
    xt, lt = xt.double(), lt.double()
    expected = td.ContinuousBernoulli(logits=lt).log_prob(xt).sum(-1)
    rtol = 2e-5 if dtype == torch.float32 else 1e-10
    atol = rtol * (1 + float(lt.abs().sum(-1).max()))
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_continuous_bernoulli_is_normalised(dtype: torch.dtype) -> None:
    """int_0^1 CB(x; lambda) dx = 1 by the trapezoid rule on a fine grid, with lambda ~ 1/2 and ~ 0 or 1."""
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    for logit_value in (-30.0, -3.0, -1e-3, 0.0, 1e-5, 0.5, 8.0):
        logits = torch.full_like(grid, logit_value).to(dtype).unsqueeze(-1)
        dens = torch.exp(log_continuous_bernoulli(grid.to(dtype).unsqueeze(-1), logits)).double()
        total = torch.trapezoid(dens, grid)
        tol = 1e-4 if dtype == torch.float32 else 1e-6
        assert abs(float(total) - 1.0) < tol, (logit_value, float(total))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_finite_at_extremes(dtype: torch.dtype) -> None:
    logits = torch.tensor([[-1e4, -30.0, -1e-2, 0.0, 1e-7, 1e-2, 30.0, 1e4]], dtype=dtype, requires_grad=True)
    xv = torch.tensor([[0.0, 0.3, 1.0, 0.5, 0.0, 1.0, 0.7, 1.0]], dtype=dtype)
    (log_continuous_bernoulli(xv, logits) + log_bernoulli(xv, logits)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    mu_ = torch.tensor([[-1e3, 0.0, 1e3]], dtype=dtype, requires_grad=True)
    log_var = torch.tensor([[2 * math.log(1e-4), 0.0, 2 * math.log(1e4)]], dtype=dtype, requires_grad=True)
    xg = torch.tensor([[-1e3 + 1e-4, 1.0, 0.0]], dtype=dtype)
    (log_normal_diag(xg, mu_, log_var) + kl_normal_std_normal(mu_, log_var)).sum().backward()
    assert torch.isfinite(mu_.grad).all() and torch.isfinite(log_var.grad).all()


# --- shapes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [(), (5,), (3, 2)])
def test_sum_over_last_dim_preserves_batch(batch: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (*batch, 7)
    a, b, c, d = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    probs = torch.rand(shape, generator=gen, dtype=torch.float64)
    results = {
        "log_standard_normal": log_standard_normal(a),
        "log_normal_diag": log_normal_diag(a, b, c),
        "log_bernoulli": log_bernoulli(probs, a),
        "log_continuous_bernoulli": log_continuous_bernoulli(probs, a),
        "kl_normal_std_normal": kl_normal_std_normal(a, b),
        "kl_normal_normal": kl_normal_normal(a, b, c, d),
    }
    for name, value in results.items():
        assert value.shape == batch, name
    # Summing over the last dim: the per-dimension values add up.
    torch.testing.assert_close(log_normal_diag(a, b, c), sum(
        log_normal_diag(a[..., i : i + 1], b[..., i : i + 1], c[..., i : i + 1]) for i in range(7)
    ))
