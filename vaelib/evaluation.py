"""Evaluating a trained VAE: test ELBO, IWAE log-likelihood, active units, KL per dimension, samples.

Everything runs without gradients, in batches, on the model's device; inputs may live on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vaelib.config import flush_denormals, model_device, model_dtype
from vaelib.errors import InvalidInputError
from vaelib.models import check_input
from vaelib.objectives import default_chunk, default_kl, default_max_elements, elbo, iwae_bound


def _batches(model, x: Tensor, batch_size: int):
    """``x`` in batches on the model's device and in its dtype (so ``x`` may live anywhere); empty data or data with
    NaN or infinite values are refused (a mean over them would be NaN, not an answer)."""
    check_input(x, model.input_dim)
    if len(x) == 0:
        raise InvalidInputError("x is empty: there is nothing to evaluate")
    finite = torch.isfinite(x).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero()[:, 0]
        raise InvalidInputError(f"x contains NaN or infinite values ({len(bad)} of {len(x)} examples, the first at "
                                f"index {int(bad[0])})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = model_device(model), model_dtype(model)
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size].to(device=device, dtype=dtype, non_blocking=True)


@torch.inference_mode()
def evaluate_elbo(model, x: Tensor, batch_size: int = 1000, kl: str | None = None) -> dict[str, float]:
    """Mean ELBO, reconstruction term and KL over ``x`` (one reparameterised sample per example).

    kl: "analytic", "mc", or None for the model's own choice (:func:`vaelib.objectives.default_kl`: the closed
    form where there is one, Monte Carlo for a prior without one, such as the VampPrior)."""
    kl = default_kl(model) if kl is None else kl
    sums = torch.zeros(3, dtype=torch.float64, device=model_device(model))
    with flush_denormals():  # subnormals count as zero on the CPU (vaelib.config.flush_denormals says why)
        for xb in _batches(model, x, batch_size):
            t = elbo(model, xb, kl=kl)
            sums += torch.stack([t.elbo.sum(), t.rec.sum(), t.kl.sum()]).double()
    means = (sums / max(1, len(x))).tolist()
    return dict(zip(("elbo", "rec", "kl"), means, strict=True))


@torch.inference_mode()
def iwae_bounds(model, x: Tensor, k: int = 5000, batch_size: int | None = None,
                max_elements: int | None = None) -> Tensor:
    """The IWAE bound of every example (shape (N,), float64 on the CPU), memory-bounded.

    Examples go ``batch_size`` at a time, samples in chunks of at most ``max_elements`` decoder outputs
    (default :func:`vaelib.objectives.default_max_elements`; see :func:`vaelib.objectives.iwae_bound`), so
    k = 5000 needs no more memory than k = 50.
    """
    device = model_device(model)
    max_elements = max_elements or default_max_elements(device)
    if batch_size is None:
        # Enough examples per batch to keep the device busy, few enough that a chunk holds >= 64 samples.
        batch_size = max(1, min(len(x), max_elements // (64 * model.input_dim), 1000))
    out = []
    with flush_denormals():  # subnormals count as zero on the CPU (vaelib.config.flush_denormals says why)
        for xb in _batches(model, x, batch_size):
            chunk = default_chunk(k, len(xb), model.input_dim, max_elements)
            out.append(iwae_bound(model, xb, k=k, chunk=chunk).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def iwae_nll(model, x: Tensor, k: int = 5000, batch_size: int | None = None,
             max_elements: int | None = None) -> float:
    """Negative log-likelihood estimate in nats: the mean over ``x`` of -IWAE_k (Burda et al. 2015)."""
    return -iwae_bounds(model, x, k, batch_size, max_elements).mean().item()


def refine_posterior(model, x: Tensor, *, steps: int = 500, lr: float = 1e-2, n_samples: int = 8,
                     kl: str = "analytic", stats: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
    """q*(z|x): the q family's stats optimised separately for every example, starting from the encoder's.

    Returns detached stats in the encoder's format (``(mu, log_var)`` for the diagonal Gaussian,
    ``(mu, log_var, lower)`` for :class:`vaelib.models.FullCovarianceEncoder`), on the model's device, which
    ``objectives.elbo(..., stats=...)`` and ``objectives.iwae_bound(..., stats=...)`` take in place of
    ``encoder(x)``. The ELBO of q* minus that of the encoder's q is the amortisation gap (Cremer, Li &
    Duvenaud 2018); log p(x) minus it is the approximation gap of the family.

    How: Adam (step ``lr``) on the stats, maximising the sum over the batch of the ELBO
    (:func:`vaelib.objectives.elbo` with ``n_samples`` reparameterised draws per example and ``kl``,
    "analytic" or "mc"). Each example's ELBO depends only on its own stats, so the sum optimises every example
    separately, and Adam's per-coordinate steps make the result independent of the batch size. The step
    decays linearly to 0 over ``steps``: with a constant step the Monte-Carlo noise of the gradient keeps the
    stats jittering around the optimum, and the decay averages it out. Gradients are taken with
    ``torch.autograd.grad`` with respect to the stats only, so the model's parameters are neither changed nor
    given a ``.grad``; it works inside ``torch.no_grad()`` too. Start from given ``stats`` (on the model's
    device) instead of ``encoder(x)`` to continue a refinement. Batch large ``x`` yourself: the memory is that
    of one ELBO with ``n_samples`` draws for all of ``x``.
    """
    if steps < 0 or lr <= 0 or n_samples < 1:
        raise ValueError(f"need steps >= 0, lr > 0 and n_samples >= 1, got {steps}, {lr}, {n_samples}")
    check_input(x, model.input_dim)
    x = x.to(device=model_device(model), dtype=model_dtype(model))
    with torch.no_grad():
        start = model.encoder(x) if stats is None else stats
    params = [s.detach().clone().requires_grad_(True) for s in start]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(1, steps))
    with torch.enable_grad():
        for _ in range(steps):
            loss = -elbo(model, x, kl=kl, n_samples=n_samples, stats=tuple(params)).elbo.sum()
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p.grad = g
            optimizer.step()
            schedule.step()
    return tuple(p.detach() for p in params)


def _se(values: Tensor) -> float:
    """Standard error of the mean of per-example values."""
    return (values.std() / len(values) ** 0.5).item() if len(values) > 1 else 0.0


def refine_until_stalled(model, x: Tensor, *, steps: int = 500, max_rounds: int = 4, tol: float = 0.01,
                         n_eval: int = 1000, lr: float = 1e-2, n_samples: int = 8, kl: str = "analytic",
                         stats: tuple[Tensor, ...] | None = None,
                         seed: int = 0) -> tuple[tuple[Tensor, ...], list[dict[str, float]]]:
    """:func:`refine_posterior` run longer until it stops improving: the shortfall of a refinement, measured.

    A first run of ``steps``, then up to ``max_rounds`` more, each twice as long as the one before and continuing
    from its result, until a round raises the mean ELBO over ``x`` by less than ``tol`` nats. Each result's
    ELBO is estimated with ``n_eval`` reparameterised draws per example, the same draws for every result (common
    random numbers, from ``seed``; the global RNG is left as it was), so the gain of a round is a paired difference.

    Returns the last stats and one row per run: ``steps`` (total so far), ``elbo`` (the mean estimate), ``gain``
    (over the previous run; the first run's over the start) and ``se`` (its standard error over the examples), and
    ``total_gain`` and ``total_se``, the same over the start. Started from a refined q (``stats``), the last
    ``total_gain`` is that q's shortfall as far as longer refinement can find it; the last ``gain`` says what the
    last doubling still bought: a refinement that stalls has not necessarily reached the optimum.
    """
    if max_rounds < 0 or n_eval < 1:
        raise ValueError(f"need max_rounds >= 0 and n_eval >= 1, got {max_rounds}, {n_eval}")
    x = x.to(device=model_device(model), dtype=model_dtype(model))
    if stats is None:
        with torch.no_grad():
            stats = model.encoder(x)

    @torch.no_grad()
    def elbo_per_example(current: tuple[Tensor, ...]) -> Tensor:
        device = x.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            total = torch.zeros(len(x), dtype=torch.float64, device=device)
            for start in range(0, n_eval, 100):
                n = min(100, n_eval - start)
                total += elbo(model, x, kl=kl, n_samples=n, stats=current).elbo.double() * n
        return (total / n_eval).cpu()

    previous = start = elbo_per_example(stats)
    rows: list[dict[str, float]] = []
    run_steps, total_steps = steps, 0
    for _ in range(max_rounds + 1):
        stats = refine_posterior(model, x, steps=run_steps, lr=lr, n_samples=n_samples, kl=kl, stats=stats)
        total_steps += run_steps
        current = elbo_per_example(stats)
        gain, total = current - previous, current - start
        rows.append(dict(steps=total_steps, elbo=current.mean().item(), gain=gain.mean().item(), se=_se(gain),
                         total_gain=total.mean().item(), total_se=_se(total)))
        if gain.mean().item() < tol:
            break
        previous, run_steps = current, 2 * run_steps
    return stats, rows


@torch.no_grad()
def encode_means(model, x: Tensor, batch_size: int = 1000) -> Tensor:
    """E_q[z|x] = mu(x) for every example, (N, latent_dim) on the CPU."""
    return torch.cat([model.encoder(xb)[0].cpu() for xb in _batches(model, x, batch_size)])


@torch.no_grad()
def active_units(model, x: Tensor, threshold: float = 0.01, batch_size: int = 1000) -> tuple[int, Tensor]:
    """Active units (Burda et al. 2015): dimensions j with Var_x(E_q[z_j | x]) > threshold.

    Returns the count and the per-dimension variances (population variance over the examples).
    """
    mu = encode_means(model, x, batch_size).double()
    variances = mu.var(dim=0, correction=0).float()
    return int((variances > threshold).sum()), variances


def has_kl_per_dimension(model) -> bool:
    """Whether the KL splits into one closed-form term per latent dimension: a diagonal q and a prior with a
    factorised closed form. Not for a full-covariance q (its KL has cross terms) or a VampPrior (no closed form)."""
    return hasattr(model.prior, "kl") and not hasattr(model.encoder, "kl_to_standard_normal")


@torch.no_grad()
def kl_per_dimension(model, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Mean over x of KL(q(z_j|x) || p(z_j)) for each latent dimension j: (latent_dim,), sums to the mean KL."""
    if not has_kl_per_dimension(model):
        raise ValueError("the KL does not split per latent dimension for this model: it needs a diagonal q and a "
                         "prior with a closed-form KL (see has_kl_per_dimension)")
    total = torch.zeros(model.latent_dim, dtype=torch.float64)
    for xb in _batches(model, x, batch_size):
        mu, log_var = model.encoder(xb)
        # The prior's closed form sums over the last axis; a trailing axis of size 1 keeps each dimension apart.
        total += model.prior.kl(mu.unsqueeze(-1), log_var.unsqueeze(-1)).sum(0).double().cpu()
    return (total / max(1, len(x))).float()


@torch.no_grad()
def reconstructions(model, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Decoder means at the encoder means, (N, input_dim) on the CPU."""
    return torch.cat([model.reconstruct(xb).cpu() for xb in _batches(model, x, batch_size)])


@torch.no_grad()
def samples(model, n: int, seed: int | None = 0) -> Tensor:
    """n decoder means at prior draws (seeded), (n, input_dim) on the CPU."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model_device(model)).manual_seed(seed)
    return model.sample(n, generator=gen).cpu()


__all__ = ["active_units", "encode_means", "evaluate_elbo", "has_kl_per_dimension", "iwae_bounds", "iwae_nll",
           "kl_per_dimension",
           "reconstructions", "refine_posterior", "refine_until_stalled", "samples"]
