"""Training objectives: the ELBO (analytic or Monte-Carlo KL, beta weight, warm-up) and the IWAE bound.

All functions return one value per example; reduce with ``.mean()`` (or :meth:`ElboTerms.loss`).
A model is anything with ``encoder(x) -> stats`` (a tuple of tensors, ``(mu, log_var)`` for the diagonal
Gaussian), ``encoder.rsample(stats, n)``, ``encoder.log_prob(x, z, stats=stats)``, ``decoder.log_prob(x, z)`` and
``prior.log_prob(z)`` (plus, for the analytic KL, ``prior.kl(*stats)`` or, with the standard normal prior,
``encoder.kl_to_standard_normal(stats)``: :func:`analytic_kl`), e.g. :class:`vaelib.models.VAE`.
Functions that take ``stats`` use them in place of ``encoder(x)``: an optimised per-example q, for instance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vaelib.config import model_device

KL_ESTIMATORS = ("analytic", "mc")
OBJECTIVES = ("elbo", "iwae")


@dataclass
class ElboTerms:
    """Per-example ELBO pieces: ``elbo = rec - kl``; ``rec`` = one-sample estimate of E_q[log p(x|z)]."""

    elbo: Tensor
    rec: Tensor
    kl: Tensor
    beta: float | Tensor = 1.0

    def loss(self, beta: float | Tensor | None = None) -> Tensor:
        """The minimised scalar: mean over the batch of -(rec - beta * kl)."""
        b = self.beta if beta is None else beta
        return -(self.rec - b * self.kl).mean()

    def summary(self) -> dict[str, float]:
        """Batch means as Python floats."""
        return {"elbo": self.elbo.mean().item(), "rec": self.rec.mean().item(), "kl": self.kl.mean().item()}


def to_model(model, x: Tensor) -> Tensor:
    """``x`` on the model's device (a no-op when it is there already): data from any device is accepted."""
    device = model_device(model)
    return x if x.device == device else x.to(device)


def elbo(model, x: Tensor, beta: float | Tensor = 1.0, kl: str = "analytic", n_samples: int = 1,
         stats: tuple[Tensor, ...] | None = None) -> ElboTerms:
    """ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) per example, with reparameterised samples.

    kl="analytic" uses the prior's closed form (Kingma & Welling 2013, Appendix B); kl="mc" estimates it from
    the same z as the reconstruction term, log q(z|x) - log p(z). ``beta`` only enters :meth:`ElboTerms.loss`.
    """
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {kl!r}")
    x = to_model(model, x)
    stats = model.encoder(x) if stats is None else stats
    z = model.encoder.rsample(stats, None if n_samples == 1 else n_samples)
    rec = model.decoder.log_prob(x, z)
    if kl == "analytic":
        kl_value = analytic_kl(model, stats)
    else:
        kl_value = model.encoder.log_prob(x, z, stats=stats) - model.prior.log_prob(z)
    if n_samples != 1:
        rec, kl_value = rec.mean(0), kl_value.mean(0) if kl_value.dim() > 1 else kl_value
    return ElboTerms(elbo=rec - kl_value, rec=rec, kl=kl_value, beta=beta)


def _encoder_kl_applies(model) -> bool:
    """Whether the q family's own closed form against N(0, I) (``encoder.kl_to_standard_normal``) is the KL here."""
    return getattr(model.prior, "standard_normal", False) and hasattr(model.encoder, "kl_to_standard_normal")


def has_analytic_kl(model) -> bool:
    """Whether KL(q(z|x) || p(z)) has a closed form here: the prior has one (``prior.kl``), or the encoder's q family
    has one against the standard normal prior (``encoder.kl_to_standard_normal``)."""
    return _encoder_kl_applies(model) or hasattr(model.prior, "kl")


def default_kl(model) -> str:
    """The KL estimator to use when none is named: "analytic" where a closed form exists, else "mc"."""
    return "analytic" if has_analytic_kl(model) else "mc"


def analytic_kl(model, stats: tuple[Tensor, ...]) -> Tensor:
    """KL(q(z|x) || p(z)) per example in closed form: the q family's own formula against N(0, I) where it has one
    (a full-covariance q), else the prior's, which takes the diagonal Gaussian's (mu, log_var).

    A prior without a closed form (a mixture such as :class:`vaelib.models.VampPrior`) is a ValueError that says
    to estimate the KL by Monte Carlo instead.
    """
    if _encoder_kl_applies(model):
        return model.encoder.kl_to_standard_normal(stats)
    if not hasattr(model.prior, "kl"):
        raise ValueError(f"the prior {type(model.prior).__name__} has no closed-form KL(q || p); use kl='mc' (the "
                         "Monte-Carlo estimate log q(z|x) - log p(z))")
    return model.prior.kl(*stats)


def kl_warmup(epoch: int, warmup_epochs: int, beta: float = 1.0) -> float:
    """beta for 1-based ``epoch`` under a linear warm-up: 0 in epoch 1, ``beta`` from epoch warmup_epochs + 1.

    (Bowman et al. 2016; Sonderby et al. 2016.) With warmup_epochs = 0 it is ``beta`` throughout.
    """
    if warmup_epochs <= 0:
        return float(beta)
    return float(beta) * min(1.0, (epoch - 1) / warmup_epochs)


def log_importance_weights(model, x: Tensor, k: int, stats: tuple[Tensor, ...] | None = None) -> Tensor:
    """log w_i = log p(x, z_i) - log q(z_i|x) for k draws z_i ~ q(z|x): shape (k, batch)."""
    stats = model.encoder(x) if stats is None else stats
    z = model.encoder.rsample(stats, k)
    return model.decoder.log_prob(x, z) + model.prior.log_prob(z) - model.encoder.log_prob(x, z, stats=stats)


#: IWAE chunk bounds (decoder outputs per chunk) on a CUDA device and elsewhere; see :func:`default_max_elements`.
CUDA_MAX_ELEMENTS, CPU_MAX_ELEMENTS = 2**27, 2**20


def default_max_elements(device: torch.device) -> int:
    """The IWAE chunk bound: decoder outputs in one (chunk, batch, input_dim) tensor, 2^27 (512 MiB of float32)
    on a GPU; elsewhere 2^20 (4 MiB), sized for a CPU's cache: the likelihood's elementwise passes over the chunk
    then read it from cache, not memory (k = 5000 on a 784-400-20 model: 1.3x its matrix products' time, against
    4.4x with 64 MiB chunks; benchmarks/train_speed.py measures it)."""
    return CUDA_MAX_ELEMENTS if device.type == "cuda" else CPU_MAX_ELEMENTS


def default_chunk(k: int, batch: int, input_dim: int, max_elements: int) -> int:
    """Samples per chunk so that one (chunk, batch, input_dim) tensor stays under ``max_elements``."""
    return max(1, min(k, max_elements // max(1, batch * input_dim)))


def iwae_bound(model, x: Tensor, k: int = 50, chunk: int | None = None, max_elements: int | None = None,
               stats: tuple[Tensor, ...] | None = None) -> Tensor:
    """The IWAE bound (Burda et al. 2015) per example: log (1/k) sum_i w_i, with k samples.

    Samples are drawn ``chunk`` at a time (default: as many as fit ``max_elements`` decoder outputs, by default
    :func:`default_max_elements` of the model's device); each
    chunk is reduced with logsumexp and the chunks are combined with a second logsumexp, which is exact:
    logsumexp over all k = logsumexp over chunks of (logsumexp within chunk). k = 1 is the ELBO with a
    Monte-Carlo KL, sample by sample (the same draw gives the same value), which is why
    ``fit(objective="iwae", k=1)`` and ``fit(kl="mc")`` train alike.

    As a training loss, -L_k has the gradient -sum_i w~_i grad log w_i, with w~_i = w_i / sum_j w_j the
    self-normalised importance weights (Burda et al. 2015): autograd through the logsumexp gives it.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = to_model(model, x)
    stats = model.encoder(x) if stats is None else stats
    if chunk is None:
        chunk = default_chunk(k, len(x), x.shape[-1], max_elements or default_max_elements(x.device))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    partial = [torch.logsumexp(log_importance_weights(model, x, min(chunk, k - start), stats), dim=0)
               for start in range(0, k, chunk)]
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)


__all__ = ["CPU_MAX_ELEMENTS", "CUDA_MAX_ELEMENTS", "OBJECTIVES", "ElboTerms",
           "KL_ESTIMATORS", "analytic_kl", "default_chunk", "default_kl",
           "default_max_elements", "elbo", "has_analytic_kl", "iwae_bound", "kl_warmup", "log_importance_weights",
           "to_model"]
