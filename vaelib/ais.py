"""Annealed importance sampling (AIS) estimates of log p(x) for a VAE (Neal 2001; Wu et al. 2017).

AIS moves k chains per example from a start distribution pi_0 (the prior p(z), or the encoder's q(z|x))
to the posterior p(z|x) along the geometric path

    pi_t(z) ∝ gamma_t(z) = pi_0(z)^(1 - tau_t) p(x, z)^tau_t,    0 = tau_0 < tau_1 < ... < tau_T = 1,

and weights each chain by log w = sum_{t=1}^T [log gamma_t(z_{t-1}) - log gamma_{t-1}(z_{t-1})]
= sum_t (tau_t - tau_{t-1}) [log p(x, z_{t-1}) - log pi_0(z_{t-1})], where z_t comes from a Markov
transition that leaves pi_t invariant (HMC or MALA). E[w] = p(x) exactly, for any T and any such
transitions chosen before the chains run -- which is why the step sizes are adapted on a separate pilot run
and then frozen (the default); (1/k) sum w over the chains is therefore unbiased, and its logarithm, the
estimate returned, is a stochastic lower bound whose bias shrinks as T grows. Reverse AIS from an exact
posterior draw (:func:`bdmc`, on data simulated from the model) gives a stochastic upper bound.
With T = 1 no transition runs and AIS is plain
importance sampling from pi_0 (the IWAE bound when pi_0 is the encoder).

The model is anything with the interface of :mod:`vaelib.objectives` (``encoder(x) -> stats``,
``encoder.rsample``/``encoder.log_prob``, ``decoder.log_prob``, ``prior.log_prob``/``prior.sample``). All
chains of a batch of examples run at once, as tensors (k, batch, latent_dim) on the model's device; the
gradients the transitions need are taken with respect to z only, so the model's parameters get none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from vaelib.config import flush_denormals, model_device, model_dtype

STARTS = ("prior", "encoder")
TRANSITIONS = ("hmc", "mala")
SCHEDULES = ("sigmoidal", "geometric", "linear")
ADAPTATIONS = ("pilot", "online")

# A log-density of z (shape (..., J)) returning (log f(z), grad log f(z)); the transitions see only this.
LogDensity = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class AISResult:
    """Per-example AIS output: ``log_px`` (batch,) = log (1/k) sum_chains w; ``log_weights`` (k, batch);
    ``acceptance`` (T - 1,) the mean acceptance rate of the transition at each intermediate temperature;
    ``step_sizes`` (T - 1, batch) the step each example's chains used there."""

    log_px: Tensor
    log_weights: Tensor
    acceptance: Tensor
    step_sizes: Tensor | None = None

    @property
    def ess(self) -> Tensor:
        """Effective sample size of the k weights per example, (sum w)^2 / sum w^2, in [1, k]."""
        return effective_sample_size(self.log_weights)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """(sum w)^2 / sum w^2 over dim 0, from log-weights (the weights themselves under- or overflow)."""
    return torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0))


def annealing_schedule(n_steps: int, kind: str = "sigmoidal", *, sharpness: float = 4.0,
                       start: float = 1e-4, dtype: torch.dtype = torch.float64) -> Tensor:
    """Inverse temperatures tau_0 = 0 < tau_1 < ... < tau_T = 1 (T = ``n_steps``), shape (T + 1,).

    "sigmoidal" (Grosse et al. 2013, as in Wu et al. 2017): tau_t proportional to sigmoid(sharpness (2t/T - 1)),
    shifted and scaled to run from 0 to 1 -- small steps at both ends, where the log-weight increments vary most;
    "geometric": tau_1 = ``start`` and a constant ratio tau_{t+1} / tau_t up to 1; "linear": t / T.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a sequence of taus, got {kind!r}")
    t = torch.arange(n_steps + 1, dtype=dtype) / n_steps
    if kind == "linear" or n_steps == 1:
        return t
    if kind == "sigmoidal":
        s = torch.sigmoid(sharpness * (2 * t - 1))
        return (s - s[0]) / (s[-1] - s[0])
    if not 0 < start < 1:
        raise ValueError(f"the geometric schedule's start must be in (0, 1), got {start}")
    taus = torch.logspace(math.log10(start), 0.0, n_steps, dtype=dtype)
    return torch.cat([torch.zeros(1, dtype=dtype), taus])


def _as_schedule(schedule: str | Sequence[float] | Tensor, n_steps: int) -> Tensor:
    """The taus as a float64 CPU tensor, checked: 0 first, 1 last, strictly increasing."""
    if isinstance(schedule, str):
        return annealing_schedule(n_steps, schedule)
    taus = torch.as_tensor(schedule, dtype=torch.float64).cpu()
    if taus.ndim != 1 or len(taus) != n_steps + 1:
        raise ValueError(f"a schedule for n_steps={n_steps} needs {n_steps + 1} taus, got shape {tuple(taus.shape)}")
    if taus[0] != 0 or taus[-1] != 1 or not bool((taus[1:] > taus[:-1]).all()):
        raise ValueError("the taus must increase strictly from 0 to 1")
    return taus


def hmc_step(z: Tensor, log_density: LogDensity, step_size: Tensor, n_leapfrog: int,
             current: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """One Hamiltonian Monte Carlo transition per chain (Neal 2011), unit mass matrix.

    Draws a momentum p ~ N(0, I), runs ``n_leapfrog`` leapfrog steps of size ``step_size`` (broadcast against
    z's leading dimensions, e.g. (batch,) or (k, batch)) on H(z, p) = -log f(z) + |p|^2 / 2, and accepts
    with probability min(1, exp(H_old - H_new)): the Metropolis correction that makes pi ∝ f invariant
    despite the integrator's error. Returns the new z, the acceptance indicator per chain (0/1, float) and
    (log f, grad log f) at the new z, to be passed back as ``current``.
    """
    log_f, grad = log_density(z) if current is None else current
    eps = step_size.unsqueeze(-1)
    p0 = torch.randn_like(z)
    z_new, p = z, p0 + 0.5 * eps * grad
    for i in range(n_leapfrog):
        z_new = z_new + eps * p
        log_f_new, grad_new = log_density(z_new)
        p = p + (eps if i < n_leapfrog - 1 else 0.5 * eps) * grad_new
    h_old = -log_f + 0.5 * p0.pow(2).sum(-1)
    h_new = -log_f_new + 0.5 * p.pow(2).sum(-1)
    return _metropolis(z, z_new, h_old - h_new, (log_f, grad), (log_f_new, grad_new))


def mala_step(z: Tensor, log_density: LogDensity, step_size: Tensor,
              current: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """One Metropolis-adjusted Langevin transition per chain (Roberts & Tweedie 1996).

    Proposes z' = z + (eps^2 / 2) grad log f(z) + eps xi, xi ~ N(0, I), and accepts with probability
    min(1, f(z') r(z | z') / (f(z) r(z' | z))), r the Gaussian proposal density. Written with the proposal
    density, not as one leapfrog step, so that it is an independent route to the same kernel as
    ``hmc_step(..., n_leapfrog=1)``. Returns as :func:`hmc_step`.
    """
    log_f, grad = log_density(z) if current is None else current
    eps = step_size.unsqueeze(-1)
    z_new = z + 0.5 * eps**2 * grad + eps * torch.randn_like(z)
    log_f_new, grad_new = log_density(z_new)

    def log_proposal(to: Tensor, frm: Tensor, grad_frm: Tensor) -> Tensor:
        return -(to - frm - 0.5 * eps**2 * grad_frm).pow(2).sum(-1) / (2 * eps.squeeze(-1) ** 2)

    log_ratio = (log_f_new + log_proposal(z, z_new, grad_new)) - (log_f + log_proposal(z_new, z, grad))
    return _metropolis(z, z_new, log_ratio, (log_f, grad), (log_f_new, grad_new))


def _metropolis(z: Tensor, z_new: Tensor, log_ratio: Tensor, old: tuple[Tensor, Tensor],
                new: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Accept each chain's proposal with probability min(1, exp(log_ratio)); a NaN ratio rejects."""
    accept = torch.log(torch.rand_like(log_ratio)) < log_ratio  # False for NaN
    keep = accept.unsqueeze(-1)
    z_out = torch.where(keep, z_new, z)
    state = (torch.where(accept, new[0], old[0]), torch.where(keep, new[1], old[1]))
    return z_out, accept.to(z.dtype), state


def ais_log_likelihood(model, x: Tensor, *, n_steps: int = 100, n_chains: int = 16, start: str = "encoder",
                       transition: str = "hmc", schedule: str | Sequence[float] | Tensor = "sigmoidal",
                       n_leapfrog: int = 10, step_size: float | Tensor = 0.05,
                       target_acceptance: float | None = 0.65, adaptation: str = "pilot",
                       pilot_chains: int | None = None, batch_size: int | None = None,
                       seed: int | None = None) -> AISResult:
    """AIS estimate of log p(x) for every row of ``x``: T = ``n_steps`` temperatures, k = ``n_chains`` chains.

    ``start``: pi_0 = "prior" p(z) or "encoder" q(z|x) (the model's own q family, through ``encoder.rsample``
    and ``encoder.log_prob``). ``transition``: "hmc" (``n_leapfrog`` leapfrog steps) or "mala", one transition
    per intermediate temperature. ``schedule``: a name of :func:`annealing_schedule` or the T + 1 taus.

    Step sizes. A float ``step_size`` is the initial step per example; with ``target_acceptance`` set it is
    adapted after each temperature, multiplied by 1.02 when the mean acceptance over the example's chains
    exceeds the target and divided by 1.02 otherwise (as Wu et al.'s code does). ``adaptation="pilot"`` (the
    default) adapts on a separate pilot run of ``pilot_chains`` chains (default ``max(2, n_chains // 4)``)
    and then runs the k chains with those steps frozen: the steps depend on the pilot's draws only, so given
    them the k chains are independent and exact AIS, E[w] = p(x). ``adaptation="online"`` adapts on the k
    chains themselves, as Wu et al. do: cheaper, but the steps depend on the chains' past, so E[w] = p(x)
    holds only approximately. ``target_acceptance=None`` keeps ``step_size`` fixed; a tensor ``step_size``
    of shape (T - 1,) or (T - 1, len(x)) gives the frozen step of every intermediate temperature (with
    ``target_acceptance=None``). ``seed``: the draws come from torch's generators seeded with it (their state
    outside is left as it was); None uses them as they are.

    Returns an :class:`AISResult` (estimates, log-weights, acceptance rates, the steps used) on the model's
    device.
    """
    taus, steps, x = _check_arguments(model, x, n_steps, n_chains, start, transition, schedule, n_leapfrog,
                                      step_size, target_acceptance, adaptation, pilot_chains)
    pilot_chains = pilot_chains or max(2, n_chains // 4)
    online = target_acceptance if adaptation == "online" else None
    batch_size = batch_size or len(x)
    parts = []
    with _seeded(x.device, seed), flush_denormals():  # vaelib.config.flush_denormals says why
        for xb, sb in zip(x.split(batch_size), steps.split(batch_size, dim=1), strict=True):
            if target_acceptance is not None and adaptation == "pilot" and n_steps > 1:  # T = 1: no moves
                sb = _ais_batch(model, xb, taus, pilot_chains, start, transition, n_leapfrog, sb,
                                target_acceptance).step_sizes
            parts.append(_ais_batch(model, xb, taus, n_chains, start, transition, n_leapfrog, sb, online))
    return _combine(parts, [len(xb) for xb in x.split(batch_size)])


@dataclass
class BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al. 2015) on examples x with exact posterior draws z:
    ``forward.log_px`` is forward AIS (a stochastic lower bound on log p(x)); ``reverse.log_px`` is reverse AIS
    from the exact draws (a stochastic upper bound; its ``log_weights`` estimate log(1 / p(x)))."""

    forward: AISResult
    reverse: AISResult

    @property
    def width(self) -> Tensor:
        """Per-example sandwich width, upper minus lower estimate: it bounds the error of either side."""
        return self.reverse.log_px - self.forward.log_px


def bdmc(model, x: Tensor, z: Tensor, *, n_steps: int = 100, n_chains: int = 16, start: str = "encoder",
         transition: str = "hmc", schedule: str | Sequence[float] | Tensor = "sigmoidal", n_leapfrog: int = 10,
         step_size: float | Tensor = 0.05, target_acceptance: float | None = 0.65,
         pilot_chains: int | None = None, batch_size: int | None = None, seed: int | None = None) -> BDMCResult:
    """Forward and reverse AIS on examples ``x`` simulated from the model with their latent vectors ``z``
    (shape (len(x), J); (x, z) ~ p(z) p(x|z), so z is an exact draw from p(z|x)).

    Reverse AIS starts every chain at z, at tau = 1, runs the same transitions down the same schedule and
    accumulates log w_rev = sum_t (tau_{t-1} - tau_t) [log p(x, z_t) - log pi_0(z_t)], with E[w_rev] = 1 / p(x)
    (the forward argument with the paths reversed); -log mean(w_rev) is a stochastic upper bound on log p(x).
    Both directions use the same frozen step sizes (adapted on a pilot run, as in :func:`ais_log_likelihood`),
    so neither depends on its own chains. Only valid on simulated data: on real x no exact posterior draw
    exists.
    """
    forward = ais_log_likelihood(model, x, n_steps=n_steps, n_chains=n_chains, start=start,
                                 transition=transition, schedule=schedule, n_leapfrog=n_leapfrog,
                                 step_size=step_size, target_acceptance=target_acceptance,
                                 adaptation="pilot", pilot_chains=pilot_chains, batch_size=batch_size,
                                 seed=seed)
    taus = _as_schedule(schedule, n_steps).flip(0)
    x = x.to(device=model_device(model), dtype=model_dtype(model))
    z = z.to(device=x.device, dtype=x.dtype)
    if z.shape != (len(x), getattr(model, "latent_dim", z.shape[-1])):
        raise ValueError(f"z must have shape ({len(x)}, latent_dim), got {tuple(z.shape)}")
    steps = forward.step_sizes.flip(0)
    batch_size = batch_size or len(x)
    parts = []
    with _seeded(x.device, None if seed is None else seed + 1), flush_denormals():
        for xb, zb, sb in zip(x.split(batch_size), z.split(batch_size), steps.split(batch_size, dim=1),
                              strict=True):
            part = _ais_batch(model, xb, taus, n_chains, start, transition, n_leapfrog, sb, None,
                              z=zb.expand(n_chains, *zb.shape).clone())
            part.log_px = -part.log_px  # -log (1/k) sum w_rev: the upper estimate of log p(x)
            parts.append(part)
    return BDMCResult(forward=forward, reverse=_combine(parts, [len(xb) for xb in x.split(batch_size)]))


def _check_arguments(model, x, n_steps, n_chains, start, transition, schedule, n_leapfrog, step_size,
                     target_acceptance, adaptation, pilot_chains) -> tuple[Tensor, Tensor, Tensor]:
    """Validate the arguments; return the taus, the steps (T - 1, len(x)) and x on the model's device."""
    if n_steps < 1 or n_chains < 1 or n_leapfrog < 1:
        raise ValueError(f"n_steps, n_chains and n_leapfrog must be >= 1, got {n_steps}, {n_chains}, {n_leapfrog}")
    if pilot_chains is not None and pilot_chains < 1:
        raise ValueError(f"pilot_chains must be >= 1, got {pilot_chains}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if transition not in TRANSITIONS:
        raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
    if adaptation not in ADAPTATIONS:
        raise ValueError(f"adaptation must be one of {ADAPTATIONS}, got {adaptation!r}")
    if target_acceptance is not None and not 0 < target_acceptance < 1:
        raise ValueError(f"target_acceptance must be in (0, 1) or None, got {target_acceptance}")
    taus = _as_schedule(schedule, n_steps)
    device, dtype = model_device(model), model_dtype(model)
    x = x.to(device=device, dtype=dtype)
    n_moves = max(0, n_steps - 1)
    if isinstance(step_size, Tensor):
        if target_acceptance is not None:
            raise ValueError("a tensor step_size is a frozen schedule: pass target_acceptance=None with it")
        steps = step_size.to(device=device, dtype=dtype)
        if steps.shape == (n_moves,):
            steps = steps.unsqueeze(1).expand(n_moves, len(x))
        if steps.shape != (n_moves, len(x)):
            raise ValueError(f"a step_size tensor needs shape ({n_moves},) or ({n_moves}, {len(x)}), "
                             f"got {tuple(step_size.shape)}")
    else:
        steps = torch.full((n_moves, len(x)), float(step_size), dtype=dtype, device=device)
    if not bool(((steps > 0) & torch.isfinite(steps)).all()):
        raise ValueError(f"step sizes must be finite positive numbers, got {step_size}")
    return taus, steps, x


@contextmanager
def _seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """torch's generators seeded with ``seed`` inside the block and restored after it (None: left alone)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def _combine(parts: list[AISResult], sizes: list[int]) -> AISResult:
    """One AISResult from the batches' results (acceptance averaged with the batches' sizes as weights)."""
    acceptance = torch.stack([p.acceptance * n for p, n in zip(parts, sizes, strict=True)])
    return AISResult(log_px=torch.cat([p.log_px for p in parts]),
                     log_weights=torch.cat([p.log_weights for p in parts], dim=1),
                     acceptance=acceptance.sum(0) / max(1, sum(sizes)),
                     step_sizes=torch.cat([p.step_sizes for p in parts], dim=1))


def _log_weight_increment(tau_before: float, tau: float, log_joint: Tensor, log_start: Tensor) -> Tensor:
    """log gamma_t(z) - log gamma_{t-1}(z) = (tau_t - tau_{t-1}) [log p(x, z) - log pi_0(z)], eq. (weight)."""
    return (tau - tau_before) * (log_joint - log_start).double()


def _ais_batch(model, x: Tensor, taus: Tensor, k: int, start: str, transition: str, n_leapfrog: int,
               steps: Tensor, target_acceptance: float | None, z: Tensor | None = None) -> AISResult:
    """AIS for one batch of examples: all k chains at once, z of shape (k, batch, J).

    ``steps`` (T - 1, batch): the step of each intermediate temperature, or, with ``target_acceptance``, only
    its first row counts (the initial step, adapted online). ``z``: the chains' start (default: drawn from
    pi_0); with descending taus and z exact draws from the posterior this is reverse AIS.
    """
    with torch.no_grad():
        if start == "encoder":
            stats = tuple(s.detach() for s in model.encoder(x))
            if z is None:
                z = model.encoder.rsample(stats, k).detach()

            def log_start(z: Tensor) -> Tensor:
                return model.encoder.log_prob(x, z, stats=stats)
        else:
            if z is None:
                z = model.prior.sample(k * len(x)).reshape(k, len(x), -1).to(x.dtype)
            log_start = model.prior.log_prob

    def log_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """log p(x, z) and log pi_0(z), each (k, batch), and their gradients in z: both, so that the annealed
        density at any tau follows from them without evaluating the decoder again."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_joint = model.decoder.log_prob(x, z) + model.prior.log_prob(z)
            log_zero = log_start(z)
            # With respect to z only: no parameter gradients.
            (grad_joint,) = torch.autograd.grad(log_joint.sum(), z)
            (grad_zero,) = torch.autograd.grad(log_zero.sum(), z) if log_zero.requires_grad else (torch.zeros_like(z),)
        return log_joint.detach(), log_zero.detach(), grad_joint, grad_zero

    def at(tau: float, parts: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """(log f_tau, grad log f_tau) from the parts, f_tau = pi_0^(1 - tau) p(x, .)^tau."""
        log_joint, log_zero, grad_joint, grad_zero = parts
        return (1 - tau) * log_zero + tau * log_joint, (1 - tau) * grad_zero + tau * grad_joint

    def annealed(tau: float, last: list) -> LogDensity:
        def log_f(z: Tensor) -> tuple[Tensor, Tensor]:
            last[:] = [log_parts(z)]  # the transition's last evaluation is at its proposal
            return at(tau, last[0])
        return log_f

    step = steps[0] if len(steps) else None
    used = torch.empty_like(steps)
    log_w = torch.zeros(k, len(x), dtype=torch.float64, device=x.device)
    acceptance = torch.zeros(len(taus) - 2, dtype=torch.float64)
    # The parts at the chains' current z, carried from one temperature to the next: each transition then costs
    # its n_leapfrog gradients (one for MALA), not two more evaluations at its start.
    parts = log_parts(z)
    for t in range(1, len(taus)):
        log_w += _log_weight_increment(taus[t - 1].item(), taus[t].item(), parts[0], parts[1])
        if t == len(taus) - 1:
            break  # the weight is complete; a transition at tau = 1 would not change it
        if target_acceptance is None:
            step = steps[t - 1]
        used[t - 1] = step
        tau, last = taus[t].item(), []
        log_f = annealed(tau, last)
        if transition == "hmc":
            z, accepted, _ = hmc_step(z, log_f, step, n_leapfrog, current=at(tau, parts))
        else:
            z, accepted, _ = mala_step(z, log_f, step, current=at(tau, parts))
        keep = accepted.bool()
        parts = tuple(torch.where(keep if new.dim() == keep.dim() else keep.unsqueeze(-1), new, old)
                      for new, old in zip(last[0], parts, strict=True))
        rate = accepted.mean(0)  # per example, over its chains
        acceptance[t - 1] = rate.mean().item()
        if target_acceptance is not None:
            step = torch.where(rate > target_acceptance, step * 1.02, step / 1.02)
    log_px = torch.logsumexp(log_w, 0) - math.log(k)
    return AISResult(log_px=log_px, log_weights=log_w, acceptance=acceptance, step_sizes=used)


__all__ = ["ADAPTATIONS", "AISResult", "BDMCResult", "LogDensity", "SCHEDULES", "STARTS", "TRANSITIONS",
           "ais_log_likelihood", "annealing_schedule", "bdmc", "effective_sample_size", "hmc_step", "mala_step"]
