"""The linear-Gaussian latent-variable model and probabilistic PCA: a VAE whose every quantity is exact.

Model (Tipping & Bishop 1999):

    z ~ N(0, I_k),    x | z ~ N(W z + b, sigma^2 I_d),    W: (d, k), b: (d,), sigma > 0.

Everything a VAE can only estimate has a closed form here:

- the evidence            p(x)   = N(x; b, C),  C = W W^T + sigma^2 I_d;
- the posterior           p(z|x) = N(M^{-1} W^T (x - b), sigma^2 M^{-1}),  M = W^T W + sigma^2 I_k;
- the ELBO of a Gaussian q(z|x), since E_q[log p(x|z)] is a Gaussian expectation of a quadratic.

So the chapters use it to check the identity log p(x) = ELBO(q) + KL(q || p(z|x)) to rounding error, and
``ppca_mle`` gives the maximum-likelihood fit that a linear VAE should recover.

Shapes: data ``x`` is (..., d), latent quantities are (..., k); every per-example result has shape (...).
Computations run in the dtype of ``W`` (float64 recommended for identity checks; float32 works).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vaelib.distributions import LOG_2PI, kl_normal_std_normal, log_normal_diag, log_standard_normal


def _kl_full_normal_std_normal(mu: Tensor, cov: Tensor) -> Tensor:
    """KL(N(mu, cov) || N(0, I)) = 1/2 [tr(cov) + |mu|^2 - k - log det cov] for a full covariance.

    The full-covariance counterpart of ``kl_normal_std_normal`` (which takes a diagonal as a log-variance);
    only ``LinearGaussian.elbo_full`` needs it, so it lives next to its one caller.
    """
    k = mu.shape[-1]
    chol = torch.linalg.cholesky(cov)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    trace = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    return 0.5 * (trace + mu.pow(2).sum(-1) - k - logdet)


class LinearGaussian:
    """z ~ N(0, I_k), x | z ~ N(W z + b, sigma^2 I_d), with exact evidence, posterior and ELBO."""

    def __init__(self, W: Tensor, b: Tensor, sigma: float | Tensor) -> None:
        if W.ndim != 2:
            raise ValueError(f"W must be (d, k), got shape {tuple(W.shape)}")
        if b.shape != (W.shape[0],):
            raise ValueError(f"b must be ({W.shape[0]},), got shape {tuple(b.shape)}")
        self.W = W
        self.b = b.to(W.dtype)
        self.sigma = torch.as_tensor(sigma, dtype=W.dtype, device=W.device)
        if self.sigma.ndim != 0 or not bool(self.sigma > 0):
            raise ValueError("sigma must be a positive scalar")

    @classmethod
    def random(
        cls,
        data_dim: int,
        latent_dim: int,
        sigma: float = 0.5,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> LinearGaussian:
        """A model with standard-normal W and b (the test problems of the book's chapters)."""
        W = torch.randn(data_dim, latent_dim, generator=generator, dtype=dtype)
        b = torch.randn(data_dim, generator=generator, dtype=dtype)
        return cls(W, b, sigma)

    @classmethod
    def from_vae(cls, model, dtype: torch.dtype = torch.float64) -> LinearGaussian:
        """The generative model of a linear VAE (``build_vae("linear")``) as a LinearGaussian on the CPU.

        W and b are the decoder's (J -> D) linear layer, sigma its Gaussian likelihood's; converted to
        ``dtype`` (float64 by default, for checks to rounding) and detached, so the result follows later
        training of ``model`` no more than a copy would.
        """
        layer, likelihood = model.decoder.net, model.decoder.likelihood
        if not isinstance(layer, torch.nn.Linear) or not hasattr(likelihood, "sigma"):
            raise ValueError("from_vae needs a linear decoder with a Gaussian likelihood (build_vae('linear'))")
        W, b, sigma = (t.detach().cpu().to(dtype) for t in (layer.weight, layer.bias, likelihood.sigma))
        return cls(W, b, sigma)

    @property
    def data_dim(self) -> int:
        return self.W.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    @property
    def log_var(self) -> Tensor:
        """log sigma^2, the form in which vaelib.distributions takes a variance."""
        return 2.0 * torch.log(self.sigma)

    # --- generative model -------------------------------------------------------------------------------
    def decode_mean(self, z: Tensor) -> Tensor:
        """E[x | z] = W z + b, for z of shape (..., k)."""
        return z @ self.W.T + self.b

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) = log N(x; W z + b, sigma^2 I); x (..., d) and z (..., k) broadcast."""
        mean = self.decode_mean(z)
        return log_normal_diag(x, mean, self.log_var.expand(mean.shape))

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log p(x | z) + log p(z)."""
        return self.log_likelihood(x, z) + log_standard_normal(z)

    def sample_joint(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n draws (z, x) from p(z) p(x|z): z (n, k), x (n, d)."""
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=self.W.dtype, device=self.W.device)
        noise = torch.randn(n, self.data_dim, generator=generator, dtype=self.W.dtype, device=self.W.device)
        return z, self.decode_mean(z) + self.sigma * noise

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x from the marginal p(x), shape (n, d)."""
        return self.sample_joint(n, generator)[1]

    # --- evidence --------------------------------------------------------------------------------------
    def marginal_covariance(self) -> Tensor:
        """C = W W^T + sigma^2 I_d, the covariance of p(x)."""
        eye = torch.eye(self.data_dim, dtype=self.W.dtype, device=self.W.device)
        return self.W @ self.W.T + self.sigma.pow(2) * eye

    def log_marginal(self, x: Tensor) -> Tensor:
        """Exact log p(x) = log N(x; b, W W^T + sigma^2 I), x (..., d) -> (...).

        Through the Cholesky factor C = L L^T: log det C = 2 sum log L_ii, and the quadratic form is
        |L^{-1}(x - b)|^2 from a triangular solve, never an explicit inverse.
        """
        chol = torch.linalg.cholesky(self.marginal_covariance())
        resid = x - self.b  # (..., d)
        # One solve with every example as a column of the right-hand side: L^{-1} R^T, (d, n). (Expanding L
        # to one copy per example instead costs a batched solve and n copies of a d x d matrix.)
        white = torch.linalg.solve_triangular(chol, resid.reshape(-1, self.data_dim).T, upper=False)
        quad = white.pow(2).sum(0).reshape(resid.shape[:-1])
        logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
        return -0.5 * (self.data_dim * LOG_2PI + logdet + quad)

    # --- posterior -------------------------------------------------------------------------------------
    def _posterior_precision_factor(self) -> Tensor:
        """Cholesky factor of M = W^T W + sigma^2 I_k (the posterior precision is M / sigma^2)."""
        eye = torch.eye(self.latent_dim, dtype=self.W.dtype, device=self.W.device)
        return torch.linalg.cholesky(self.W.T @ self.W + self.sigma.pow(2) * eye)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """p(z | x) = N(mean, cov): mean = M^{-1} W^T (x - b) of shape (..., k), cov = sigma^2 M^{-1} (k, k).

        The covariance does not depend on x, so it is returned once, not per example.
        """
        chol_m = self._posterior_precision_factor()
        proj = ((x - self.b) @ self.W).unsqueeze(-1)  # W^T (x - b), (..., k, 1)
        mean = torch.cholesky_solve(proj, chol_m.expand(*proj.shape[:-2], -1, -1)).squeeze(-1)
        cov = self.sigma.pow(2) * torch.cholesky_inverse(chol_m)
        return mean, cov

    def posterior_precision(self) -> Tensor:
        """Lambda = M / sigma^2 = I + W^T W / sigma^2, the (k, k) precision of p(z|x) (the same for every x)."""
        chol_m = self._posterior_precision_factor()
        return chol_m @ chol_m.mT / self.sigma.pow(2)

    def best_diagonal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q*(z|x), the diagonal Gaussian with the largest ELBO: (mean, log_var), each (..., k).

        Maximising the ELBO over q is minimising KL(q || p(z|x)); for a Gaussian posterior N(m, Lambda^{-1})
        and q = N(mu, diag s^2) that KL is 1/2 [sum_j Lambda_jj s_j^2 + (m - mu)^T Lambda (m - mu) - sum_j log
        s_j^2] + const, minimised by mu = m and s_j^2 = 1 / Lambda_jj (the mean-field solution; Bishop 2006,
        section 10.1.2). The variances are the *conditional* ones, smaller than the marginal Sigma_jj unless
        the posterior is uncorrelated. Its ELBO is ``elbo(x, *best_diagonal(x))``; the approximation gap of the
        diagonal family is ``log_marginal(x) - that`` = KL(q* || p(z|x)).
        """
        mean, _ = self.posterior(x)
        log_var = -torch.log(torch.diagonal(self.posterior_precision()))
        return mean, log_var.expand_as(mean)

    def kl_to_posterior(self, x: Tensor, q_mu: Tensor, q_cov: Tensor) -> Tensor:
        """KL(q || p(z|x)) for a Gaussian q = N(q_mu, q_cov), q_cov (..., k, k); the gap log p(x) - ELBO.

        Uses the posterior precision M / sigma^2 directly:
        1/2 [tr(P^{-1} S) + (m - mu)^T P^{-1} (m - mu) - k + log det P - log det S] with P^{-1} = M / sigma^2.
        """
        k = self.latent_dim
        chol_m = self._posterior_precision_factor()
        m = chol_m @ chol_m.mT
        post_mean, _ = self.posterior(x)
        diff = post_mean - q_mu
        s2 = self.sigma.pow(2)
        trace = (m * q_cov).sum((-2, -1)) / s2  # tr(M S) for symmetric M
        quad = ((diff @ m) * diff).sum(-1) / s2
        logdet_post = k * torch.log(s2) - 2.0 * torch.log(torch.diagonal(chol_m)).sum()
        logdet_q = 2.0 * torch.log(torch.diagonal(torch.linalg.cholesky(q_cov), dim1=-2, dim2=-1)).sum(-1)
        return 0.5 * (trace + quad - k + logdet_post - logdet_q)

    # --- ELBO ------------------------------------------------------------------------------------------
    def _expected_log_likelihood(self, x: Tensor, q_mu: Tensor, trace_wsw: Tensor) -> Tensor:
        """E_q[log p(x|z)] = log N(x; W mu + b, sigma^2 I) - tr(W S W^T) / (2 sigma^2).

        Because log p(x|z) is quadratic in z, its expectation is its value at the mean plus the trace term.
        """
        return self.log_likelihood(x, q_mu) - 0.5 * trace_wsw / self.sigma.pow(2)

    def elbo(self, x: Tensor, q_mu: Tensor, q_log_var: Tensor) -> Tensor:
        """Exact ELBO of the diagonal Gaussian q(z|x) = N(q_mu, diag exp(q_log_var)), all of shape (..., k).

        ELBO = E_q[log p(x|z)] - KL(q || N(0, I)), with tr(W diag(s^2) W^T) = sum_j s_j^2 |W_:j|^2.
        """
        trace_wsw = (torch.exp(q_log_var) * self.W.pow(2).sum(0)).sum(-1)
        return self._expected_log_likelihood(x, q_mu, trace_wsw) - kl_normal_std_normal(q_mu, q_log_var)

    def elbo_full(self, x: Tensor, q_mu: Tensor, q_cov: Tensor) -> Tensor:
        """Exact ELBO of a full-covariance Gaussian q(z|x) = N(q_mu, q_cov), q_cov (k, k) or (..., k, k).

        At q = p(z|x) (``posterior``) it equals ``log_marginal`` to rounding error.
        """
        trace_wsw = (self.W.T @ self.W * q_cov).sum((-2, -1))  # tr(W S W^T) = tr(W^T W S)
        return self._expected_log_likelihood(x, q_mu, trace_wsw) - _kl_full_normal_std_normal(q_mu, q_cov)


class PPCAFit(NamedTuple):
    """Maximum-likelihood probabilistic PCA; unpacks as (W, sigma2, mu, log_likelihood)."""

    W: Tensor  # (d, k), W_ml = U_k (L_k - sigma2 I)^{1/2} (the rotation R = I)
    sigma2: Tensor  # scalar, mean of the d - k discarded eigenvalues
    mu: Tensor  # (d,), the sample mean
    log_likelihood: Tensor  # scalar, the maximised log-likelihood SUMMED over the N data points

    def model(self) -> LinearGaussian:
        """The fitted model as a LinearGaussian (b = mu, sigma = sqrt(sigma2))."""
        return LinearGaussian(self.W, self.mu, torch.sqrt(self.sigma2))


def ppca_mle(X: Tensor, k: int) -> PPCAFit:
    """Closed-form maximum-likelihood pPCA of data X (N, d) with 0 < k < d latents (Tipping & Bishop 1999).

    With the sample covariance S = (1/N) sum (x_n - mu)(x_n - mu)^T and its eigenvalues l_1 >= ... >= l_d
    (eigenvectors U):  mu = mean,  sigma2 = mean(l_{k+1..d}),  W = U_k (L_k - sigma2 I)^{1/2}, and

        log L_max = -N/2 [d log 2 pi + sum_{j<=k} log l_j + (d - k) log sigma2 + d],

    the TOTAL over the N points (divide by N for the mean per point); it equals
    ``fit.model().log_marginal(X).sum()``. W is unique up to a rotation W R of its columns; R = I here.
    """
    n, d = X.shape
    if not 0 < k < d:
        raise ValueError(f"need 0 < k < d, got k={k}, d={d}")
    mu = X.mean(0)
    centred = X - mu
    cov = centred.T @ centred / n
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    # Rounding can make the smallest eigenvalues of a PSD matrix slightly negative; they are 0.
    eigvals = eigvals.clamp_min(0.0)
    sigma2 = eigvals[k:].mean()
    if not bool(sigma2 > 0):
        raise ValueError("the discarded eigenvalues are all zero: the data lie in a k-dimensional subspace")
    W = eigvecs[:, :k] * torch.sqrt((eigvals[:k] - sigma2).clamp_min(0.0))
    log_lik = -0.5 * n * (d * math.log(2.0 * math.pi) + torch.log(eigvals[:k]).sum()
                          + (d - k) * torch.log(sigma2) + d)
    return PPCAFit(W, sigma2, mu, log_lik)


__all__ = ["LinearGaussian", "PPCAFit", "ppca_mle"]
