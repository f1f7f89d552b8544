"""Closed-form log-densities and KL divergences: the one home for each formula in the book.

Conventions (as in Tomczak's intro_dgm): torch tensors in, one value per example out. Every function sums
over the last dimension, so a batch of shape (..., D) gives a result of shape (...). Variances are passed
as log-variances, which keeps sigma positive without constraints and stays finite from sigma = 1e-4 to 1e4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_normal_diag(x: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mu, diag(exp(log_var))), summed over the last dimension.

    -1/2 [log(2 pi) + log sigma^2 + (x - mu)^2 / sigma^2]: the 1/2 in front of the squared error and the
    log sigma^2 term are exactly what "MSE + const" drops (chapter on likelihoods).
    """
    return -0.5 * (LOG_2PI + log_var + (x - mu).pow(2) * torch.exp(-log_var)).sum(-1)


def log_bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(logits)) = x log p + (1 - x) log(1 - p), summed over the last dimension.

    Computed from logits (never from probabilities) so that saturated pixels give finite values.
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def _log_continuous_bernoulli_norm(logits: Tensor) -> Tensor:
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), lambda = sigmoid(logits).

    C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) = logits / (2 lambda - 1) (since logit = 2 artanh(2 lambda - 1)),
    with the limit C = 2 at lambda = 1/2; near there a Taylor expansion avoids 0/0.
    """
    near_half = (logits.abs() < 1e-2)
    safe_logits = torch.where(near_half, torch.ones_like(logits), logits)
    # 2 lambda - 1 = tanh(logits / 2); tanh avoids the cancellation of forming 2 sigmoid - 1, which cost
    # ~1e-5 of absolute accuracy in float32 just outside the Taylor region.
    exact = torch.log(safe_logits / torch.tanh(0.5 * safe_logits))
    # log C around lambda = 1/2 (logit 0): log 2 + l^2/12 - 7 l^4/1440 + O(l^6). Up to |l| = 1e-2 the
    # omitted term is < 1e-16; the second-order term alone left errors of ~1e-10.
    sq = logits.pow(2)
    taylor = math.log(2.0) + sq / 12.0 - 7.0 * sq.pow(2) / 1440.0
    return torch.where(near_half, taylor, exact)


def log_continuous_bernoulli(x: Tensor, logits: Tensor) -> Tensor:
    """log CB(x; lambda) for x in [0, 1]: the Bernoulli term plus its normaliser log C(lambda).

    Binary cross-entropy on grey levels is this density without log C, which is why it is not normalised.
    """
    return log_bernoulli(x, logits) + _log_continuous_bernoulli_norm(logits).sum(-1)


def kl_normal_std_normal(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2).

    Kingma & Welling (2013), Appendix B. expm1 keeps sigma^2 - 1 - log sigma^2 accurate when sigma is near 1,
    where the three terms cancel.
    """
    return 0.5 * (mu.pow(2) + torch.expm1(log_var) - log_var).sum(-1)


def kl_normal_normal(mu_q: Tensor, log_var_q: Tensor, mu_p: Tensor, log_var_p: Tensor) -> Tensor:
    """KL(N(mu_q, diag sigma_q^2) || N(mu_p, diag sigma_p^2)), summed over the last dimension.

    1/2 sum[log(sigma_p^2 / sigma_q^2) + (sigma_q^2 + (mu_q - mu_p)^2) / sigma_p^2 - 1], with the variance
    ratio formed in log space (r = log sigma_q^2 - log sigma_p^2) so that it neither overflows nor cancels.
    """
    log_ratio = log_var_q - log_var_p
    return 0.5 * (torch.expm1(log_ratio) - log_ratio + (mu_q - mu_p).pow(2) * torch.exp(-log_var_p)).sum(-1)


def _cholesky_logdet(chol: Tensor) -> Tensor:
    """log det(L L^T) = 2 sum log diag L, for Cholesky factors L of shape (..., D, D)."""
    return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def kl_full_normal(mu_q: Tensor, cov_q: Tensor, mu_p: Tensor, cov_p: Tensor) -> Tensor:
    """KL(N(mu_q, cov_q) || N(mu_p, cov_p)) between Gaussians with full covariances (..., D, D).

    1/2 [tr(cov_p^{-1} cov_q) + (mu_p - mu_q)^T cov_p^{-1} (mu_p - mu_q) - D + log det cov_p - log det cov_q],
    with every inverse applied through the Cholesky factor of cov_p (triangular solves, no explicit inverse) and
    the log-determinants read off the Cholesky diagonals.
    """
    chol_p = torch.linalg.cholesky(cov_p)
    chol_q = torch.linalg.cholesky(cov_q)
    # tr(cov_p^{-1} cov_q) = ||L_p^{-1} L_q||_F^2
    solved = torch.linalg.solve_triangular(chol_p, chol_q, upper=False)
    diff = (mu_p - mu_q).unsqueeze(-1)
    maha = torch.linalg.solve_triangular(chol_p, diff, upper=False).pow(2).sum((-2, -1))
    dim = mu_q.shape[-1]
    return 0.5 * (solved.pow(2).sum((-2, -1)) + maha - dim + _cholesky_logdet(chol_p) - _cholesky_logdet(chol_q))


def entropy_full_normal(cov: Tensor) -> Tensor:
    """Differential entropy of N(mu, cov) in nats: 1/2 [D (1 + log 2 pi) + log det cov], cov (..., D, D)."""
    dim = cov.shape[-1]
    return 0.5 * (dim * (1.0 + LOG_2PI) + _cholesky_logdet(torch.linalg.cholesky(cov)))


__all__ = [
    "entropy_full_normal",
    "kl_full_normal",
    "LOG_2PI",
    "log_standard_normal",
    "log_normal_diag",
    "log_bernoulli",
    "log_continuous_bernoulli",
    "kl_normal_std_normal",
    "kl_normal_normal",
]
