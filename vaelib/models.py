"""Encoders, decoders, priors and the VAE that holds them (Tomczak's intro_dgm layout).

Every component exposes ``log_prob`` and ``sample``:

* :class:`Encoder` — q(z|x) = N(mu(x), diag exp(log_var(x))); ``encoder(x) -> (mu, log_var)``;
  :class:`FullCovarianceEncoder` — q(z|x) = N(mu(x), L(x) L(x)^T); ``encoder(x) -> (mu, log_var, lower)``.
* :class:`Decoder` — a network z -> per-pixel parameters plus a :class:`Likelihood` p(x|z);
  ``decoder(z) -> params`` (logits for Bernoulli-type likelihoods, the mean for Gaussians).
* :class:`StandardNormalPrior` — p(z) = N(0, I); :class:`VampPrior` — a mixture of the encoder's posteriors at
  learned pseudo-inputs.

Data are flat float tensors of shape (batch, input_dim). Latent samples may carry leading sample
dimensions, (n, batch, latent_dim), which every ``log_prob`` broadcasts over (the IWAE bound needs it).
Densities come from :mod:`vaelib.distributions`, the one home for each formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vaelib.config import model_device, model_dtype
from vaelib.distributions import (
    LOG_2PI,
    kl_normal_std_normal,
    log_bernoulli,
    log_continuous_bernoulli,
    log_normal_diag,
    log_standard_normal,
)
from vaelib.objectives import elbo

ARCHS = ("mlp", "conv", "linear", "burda")
POSTERIORS = ("diagonal", "full")
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned", "gaussian-pixel", "continuous-bernoulli")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid,
}


def check_input(x: object, input_dim: int, name: str = "x", dtype: torch.dtype | None = None) -> Tensor:
    """Raise a TypeError/ValueError naming the expected shape unless ``x`` is a float (batch, input_dim) tensor."""
    expected = f"a floating-point tensor of shape (batch, {input_dim})"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be {expected}, got dtype {x.dtype}"
                        " (convert uint8 images with x.float() / 255)")
    if x.dim() != 2 or x.shape[1] != input_dim:
        hint = ""
        if x.dim() >= 2 and math.prod(x.shape[1:]) == input_dim:
            hint = "; flatten it with x.reshape(len(x), -1)"
        elif x.dim() == 1 and x.shape[0] == input_dim:
            hint = "; add a batch dimension with x.unsqueeze(0)"
        raise ValueError(f"{name} must have shape (batch, {input_dim}), got {tuple(x.shape)}{hint}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {dtype}; "
                        f"convert it with {name}.to({dtype})")
    return x


def mlp(sizes: Sequence[int], activation: str = "relu", final_activation: bool = False) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ...`` with ``activation`` between them (and after the last one
    when ``final_activation``)."""
    act = _activation(activation)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------------- encoders
class Encoder(nn.Module):
    """q(z|x) = N(z; mu(x), diag exp(log_var(x))). Subclasses implement :meth:`stats`."""

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.latent_dim = latent_dim

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_var), each (batch, latent_dim)."""
        check_input(x, self.input_dim, dtype=model_dtype(self))
        return self.stats(x)

    @staticmethod
    def reparameterize(mu: Tensor, log_var: Tensor, n: int | None = None) -> Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I): (batch, D), or (n, batch, D) when ``n`` is given."""
        shape = mu.shape if n is None else (n, *mu.shape)
        eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * log_var) * eps

    def rsample(self, stats: tuple[Tensor, ...], n: int | None = None) -> Tensor:
        """Reparameterised draws from the q that ``stats`` (what :meth:`forward` returns) describe."""
        return self.reparameterize(*stats, n)

    def sample(self, x: Tensor, n: int | None = None) -> Tensor:
        """Reparameterised draws z ~ q(z|x) (differentiable in the encoder's parameters)."""
        return self.rsample(self(x), n)

    def log_prob(self, x: Tensor | None, z: Tensor, *, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """log q(z|x), one value per latent vector; pass ``stats=(mu, log_var)`` to skip re-encoding x."""
        mu, log_var = self(x) if stats is None else stats
        return log_normal_diag(z, mu, log_var)


class MLPEncoder(Encoder):
    """x -> hidden layers -> (mu, log_var) from one linear head."""

    def __init__(self, input_dim: int, latent_dim: int, hidden: Sequence[int] = (400,),
                 activation: str = "relu") -> None:
        super().__init__(input_dim, latent_dim)
        self.body = mlp([input_dim, *hidden], activation, final_activation=True)
        self.head = nn.Linear(hidden[-1] if hidden else input_dim, 2 * latent_dim)

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_var = self.head(self.body(x)).chunk(2, dim=-1)
        return mu, log_var


class ConvEncoder(Encoder):
    """Two stride-2 convolutions (28 -> 14 -> 7 for MNIST), then hidden layers and a linear head."""

    def __init__(self, input_dim: int, latent_dim: int, image_shape: Sequence[int] = (1, 28, 28),
                 hidden: Sequence[int] = (256,), activation: str = "relu", channels: Sequence[int] = (32, 64)) -> None:
        super().__init__(input_dim, latent_dim)
        c, h, w = image_shape
        if math.prod(image_shape) != input_dim or h % 4 or w % 4:
            raise ValueError(f"conv encoder needs image_shape (C, H, W) with C*H*W = input_dim = {input_dim} and "
                             f"H, W divisible by 4, got {tuple(image_shape)}")
        act = _activation(activation)
        self.image_shape = tuple(image_shape)
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1), act(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1), act(),
            nn.Flatten(),
        )
        flat = channels[1] * (h // 4) * (w // 4)
        self.body = mlp([flat, *hidden], activation, final_activation=True)
        self.head = nn.Linear(hidden[-1] if hidden else flat, 2 * latent_dim)

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv(x.reshape(len(x), *self.image_shape))
        mu, log_var = self.head(self.body(h)).chunk(2, dim=-1)
        return mu, log_var


class LinearEncoder(Encoder):
    """mu(x) = W x + b and a learned log-variance that does not depend on x (Lucas et al. 2019)."""

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__(input_dim, latent_dim)
        self.mean = nn.Linear(input_dim, latent_dim)
        self.log_var = nn.Parameter(torch.zeros(latent_dim))

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = self.mean(x)
        return mu, self.log_var.expand_as(mu)


class FullCovarianceEncoder(Encoder):
    """q(z|x) = N(z; mu(x), L(x) L(x)^T), L lower-triangular with a positive diagonal (a Cholesky factor).

    ``encoder(x)`` returns the stats ``(mu, log_var, lower)``:

    * ``mu`` (batch, J), the mean;
    * ``log_var`` (batch, J), log L_jj^2: the log of the squared diagonal of L, which is the variance of z_j
      *given* z_1..z_{j-1} (with ``lower`` = 0 it is the diagonal encoder's log-variance, and such stats
      describe the same q);
    * ``lower`` (batch, J, J), whose strictly lower triangle is L's below the diagonal (the entries on and
      above the diagonal are ignored).

    All three are unconstrained real numbers, so a per-example optimiser
    (:func:`vaelib.evaluation.refine_posterior`) can move them freely and L stays a valid Cholesky factor.
    Three stats rather than ``(mu, scale_tril)`` also mean that code written for the diagonal family,
    ``mu, log_var = encoder(x)`` or ``prior.kl(*stats)``, fails loudly instead of misreading L. The KL to
    N(0, I) is :meth:`kl_to_standard_normal`.

    The network: ``features`` maps x to a (batch, feature_dim) vector; one linear head gives mu and log_var,
    a second, initialised at zero, the J(J-1)/2 below-diagonal entries, so an untrained encoder starts as
    the diagonal family and training adds correlations only where they raise the ELBO.
    """

    def __init__(self, input_dim: int, latent_dim: int, features: nn.Module, feature_dim: int) -> None:
        super().__init__(input_dim, latent_dim)
        self.features = features
        self.head = nn.Linear(feature_dim, 2 * latent_dim)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.lower_head = nn.Linear(feature_dim, len(rows))
        nn.init.zeros_(self.lower_head.weight)
        nn.init.zeros_(self.lower_head.bias)

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.features(x)
        mu, log_var = self.head(h).chunk(2, dim=-1)
        lower = h.new_zeros(len(x), self.latent_dim, self.latent_dim)
        lower[:, self._rows, self._cols] = self.lower_head(h)
        return mu, log_var, lower

    @staticmethod
    def scale_tril(stats: tuple[Tensor, ...]) -> Tensor:
        """L = diag(exp(log_var / 2)) + strictly-lower(lower): (batch, J, J)."""
        _, log_var, lower = stats
        return torch.tril(lower, diagonal=-1) + torch.diag_embed(torch.exp(0.5 * log_var))

    def rsample(self, stats: tuple[Tensor, ...], n: int | None = None) -> Tensor:
        """z = mu + L eps with eps ~ N(0, I): (batch, J), or (n, batch, J) when ``n`` is given."""
        mu = stats[0]
        shape = mu.shape if n is None else (n, *mu.shape)
        eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
        return mu + torch.einsum("bij,...bj->...bi", self.scale_tril(stats), eps)

    def log_prob(self, x: Tensor | None, z: Tensor, *, stats: tuple[Tensor, ...] | None = None) -> Tensor:
        """log q(z|x) for z (batch, J) or (..., batch, J); pass ``stats`` to skip re-encoding x.

        log N(z; mu, L L^T) = -J/2 log 2 pi - sum_j log L_jj - |L^{-1}(z - mu)|^2 / 2, with one triangular
        solve that takes every leading sample of z as a column (no inverse, no (n, batch, J, J) copies of L).
        """
        stats = self(x) if stats is None else stats
        mu, log_var = stats[0], stats[1]
        diff = z - mu  # (..., batch, J)
        batch, latent = mu.shape
        columns = diff.reshape(-1, batch, latent).permute(1, 2, 0)  # (batch, J, samples)
        white = torch.linalg.solve_triangular(self.scale_tril(stats), columns, upper=False)
        quad = white.pow(2).sum(1).permute(1, 0).reshape(diff.shape[:-1])
        return -0.5 * (latent * LOG_2PI + log_var.sum(-1) + quad)

    @staticmethod
    def kl_to_standard_normal(stats: tuple[Tensor, ...]) -> Tensor:
        """KL(N(mu, L L^T) || N(0, I)) per example, in closed form.

        1/2 [tr(L L^T) + |mu|^2 - J - log det L L^T]; since tr(L L^T) = sum_j L_jj^2 + sum_{i>j} L_ij^2 and
        log det L L^T = sum_j log L_jj^2, it is the diagonal family's KL at (mu, log_var) plus half the squared
        norm of the strictly lower triangle.
        """
        mu, log_var, lower = stats
        return kl_normal_std_normal(mu, log_var) + 0.5 * torch.tril(lower, diagonal=-1).pow(2).sum((-2, -1))


# ------------------------------------------------------------------------------------------------ likelihoods
class Likelihood(nn.Module):
    """p(x | params) per pixel, summed over pixels. ``support`` says which data it is a density for."""

    support = "real"  # "unit-interval" for the Bernoulli family

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, params: Tensor) -> Tensor:
        raise NotImplementedError


class BernoulliLikelihood(Likelihood):
    """Bernoulli(sigmoid(logits)) per pixel; for binary data (grey levels give the unnormalised BCE)."""

    support = "unit-interval"

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return log_bernoulli(x.expand_as(params), params)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def sample(self, params: Tensor) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params))


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a normalised density on [0, 1]."""

    support = "unit-interval"

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return log_continuous_bernoulli(x.expand_as(params), params)

    def mean(self, params: Tensor) -> Tensor:
        # The mean is not lambda; torch's implementation handles the lambda ~ 1/2 limit.
        return torch.distributions.ContinuousBernoulli(logits=params).mean

    def sample(self, params: Tensor) -> Tensor:
        return torch.distributions.ContinuousBernoulli(logits=params).sample()


class GaussianLikelihood(Likelihood):
    """N(x; mean, sigma^2) per pixel; sigma fixed (``learn="none"``), learned globally or per pixel.

    sigma is stored as a log-variance, so it stays positive without constraints.
    """

    def __init__(self, input_dim: int, sigma: float = 1.0, learn: str = "none") -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if learn not in ("none", "global", "pixel"):
            raise ValueError(f"learn must be 'none', 'global' or 'pixel', got {learn!r}")
        self.learn = learn
        init = torch.full((input_dim,) if learn == "pixel" else (), 2.0 * math.log(sigma))
        if learn == "none":
            self.register_buffer("log_var", init)
        else:
            self.log_var = nn.Parameter(init)

    @property
    def sigma(self) -> Tensor:
        return torch.exp(0.5 * self.log_var)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return log_normal_diag(x, params, self.log_var)

    def mean(self, params: Tensor) -> Tensor:
        return params

    def sample(self, params: Tensor) -> Tensor:
        return params + self.sigma * torch.randn_like(params)


def make_likelihood(name: str, input_dim: int, sigma: float = 1.0) -> Likelihood:
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "continuous-bernoulli":
        return ContinuousBernoulliLikelihood()
    if name in ("gaussian", "gaussian-learned", "gaussian-pixel"):
        learn = {"gaussian": "none", "gaussian-learned": "global", "gaussian-pixel": "pixel"}[name]
        return GaussianLikelihood(input_dim, sigma, learn)
    raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")


# --------------------------------------------------------------------------------------------------- decoders
class Decoder(nn.Module):
    """p(x|z): ``net`` maps z (..., latent_dim) to per-pixel parameters (..., input_dim); ``likelihood`` scores x."""

    def __init__(self, net: nn.Module, likelihood: Likelihood, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.net = net
        self.likelihood = likelihood
        self.input_dim = input_dim
        self.latent_dim = latent_dim

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must have shape (..., {self.latent_dim}), got {tuple(z.shape)}")
        return self.net(z)

    def log_prob(self, x: Tensor, z: Tensor, *, params: Tensor | None = None) -> Tensor:
        """log p(x|z) with x (batch, input_dim) and z (batch, D) or (n, batch, D) -> (batch,) or (n, batch)."""
        check_input(x, self.input_dim)
        return self.likelihood.log_prob(x, self(z) if params is None else params)

    def mean(self, z: Tensor) -> Tensor:
        """E[x|z] (images in [0, 1] for the Bernoulli family)."""
        return self.likelihood.mean(self(z))

    def sample(self, z: Tensor) -> Tensor:
        return self.likelihood.sample(self(z))


class _ConvDecoderNet(nn.Module):
    """Hidden layers, then two stride-2 transposed convolutions back to the image; output flattened."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], hidden: Sequence[int], activation: str,
                 channels: Sequence[int] = (32, 64)) -> None:
        super().__init__()
        c, h, w = image_shape
        act = _activation(activation)
        self.start = (channels[1], h // 4, w // 4)
        self.fc = mlp([latent_dim, *hidden, math.prod(self.start)], activation, final_activation=True)
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels[1], channels[0], 4, stride=2, padding=1), act(),
            nn.ConvTranspose2d(channels[0], c, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start)
        return self.deconv(h).reshape(*lead, -1)


# ------------------------------------------------------------------------------------------------------ prior
class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I)."""

    #: read by :mod:`vaelib.objectives` (which imports nothing from here): a q family's own closed-form KL to
    #: N(0, I) applies under this prior
    standard_normal = True

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        # Follows the model across .to(device) so that samples land where the model is.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return log_standard_normal(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=self._anchor.device,
                           dtype=self._anchor.dtype)

    def kl(self, mu: Tensor, log_var: Tensor) -> Tensor:
        """KL(N(mu, diag exp(log_var)) || p), in closed form."""
        return kl_normal_std_normal(mu, log_var)


class VampPrior(nn.Module):
    """p_lambda(z) = (1/C) sum_c q_phi(z | v_c): the encoder's posteriors at C learned pseudo-inputs v_c
    (Tomczak & Welling 2018, "VAE with a VampPrior").

    The pseudo-inputs are this module's one parameter, ``pseudo_inputs`` (C, input_dim). The encoder is the VAE's
    own and is registered there, not here: it is held as a plain attribute, so that ``state_dict``, ``.to()`` and
    ``parameters()`` see it once (through the VAE), while a deep copy of the VAE copies the reference with it.
    The encoder is evaluated afresh at every call, so gradients reach both the pseudo-inputs and the encoder.
    There is no closed-form KL(q || p) for a mixture prior: the ELBO needs ``kl="mc"``.
    """

    #: rows of z per step of the mixture's log-density, so that the (rows, C, D) intermediate stays small
    MAX_ELEMENTS = 2**22

    def __init__(self, encoder: Encoder, n_pseudo_inputs: int | None = None, init: Tensor | None = None) -> None:
        """``init``: the starting pseudo-inputs, (C, input_dim), e.g. C training images; without it, C =
        ``n_pseudo_inputs`` (default 500) near-blank images."""
        super().__init__()
        if init is not None and n_pseudo_inputs not in (None, len(init)):
            raise ValueError(f"n_pseudo_inputs={n_pseudo_inputs} but init holds {len(init)} pseudo-inputs")
        n_pseudo_inputs = len(init) if init is not None else (500 if n_pseudo_inputs is None else n_pseudo_inputs)
        if n_pseudo_inputs < 1:
            raise ValueError(f"a VampPrior needs at least one pseudo-input, got {n_pseudo_inputs}")
        object.__setattr__(self, "encoder", encoder)  # not a submodule: the VAE owns it
        self.latent_dim = encoder.latent_dim
        if init is None:
            # Near-blank images with a little noise, N(0.05, 0.01^2) per pixel: distinct but uninformative.
            # (Tomczak & Welling's code also starts near blank images, or, as an option, at training images:
            # pass those as ``init``.)
            init = 0.05 + 0.01 * torch.randn(n_pseudo_inputs, encoder.input_dim)
        check_input(init, encoder.input_dim, "init")
        self.pseudo_inputs = nn.Parameter(init.detach().clone())

    @property
    def n_components(self) -> int:
        return len(self.pseudo_inputs)

    def log_prob(self, z: Tensor) -> Tensor:
        """log p_lambda(z) = logsumexp_c log q(z | v_c) - log C, for z of shape (..., D) -> (...).

        Each z is scored under every component through the encoder's own ``log_prob`` (any q family), in slices
        of rows so that memory stays bounded when z carries many importance samples.
        """
        stats = self.encoder(self.pseudo_inputs)
        flat = z.reshape(-1, 1, z.shape[-1])  # (rows, 1, D) against the components' (C, D)
        rows = max(1, self.MAX_ELEMENTS // (self.n_components * z.shape[-1]))
        # Each slice as (rows, C, D): the C components are the "batch" every q family's log_prob scores.
        parts = [torch.logsumexp(self.encoder.log_prob(None, piece.expand(-1, self.n_components, -1), stats=stats),
                                 dim=-1)
                 for piece in flat.split(rows)]
        return (torch.cat(parts) - math.log(self.n_components)).reshape(z.shape[:-1])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws: a component c uniformly, then z ~ q(z | v_c). With a ``generator`` the draws depend on it
        alone (the encoder's sampler runs under a forked global RNG seeded from it)."""
        stats = self.encoder(self.pseudo_inputs)
        device = self.pseudo_inputs.device
        index = torch.randint(self.n_components, (n,), generator=generator, device=device)
        chosen = tuple(s.index_select(0, index) for s in stats)
        if generator is None:
            return self.encoder.rsample(chosen)
        seed = int(torch.randint(2**62, (), generator=generator, device=device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.encoder.rsample(chosen)

    def extra_repr(self) -> str:
        return f"pseudo_inputs={self.n_components}"


PRIORS = ("standard", "vamp")


# -------------------------------------------------------------------------------------------------------- VAE
class VAE(nn.Module):
    """Encoder + decoder + prior. ``config`` is the plain dict that :func:`build_vae` rebuilds it from."""

    def __init__(self, encoder: Encoder, decoder: Decoder, prior: nn.Module | None = None,
                 config: dict | None = None) -> None:
        super().__init__()
        if encoder.latent_dim != decoder.latent_dim:
            raise ValueError(f"encoder latent_dim {encoder.latent_dim} != decoder latent_dim {decoder.latent_dim}")
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior if prior is not None else StandardNormalPrior(encoder.latent_dim)
        self.config = dict(config or {})
        self.latent_dim = encoder.latent_dim
        self.input_dim = encoder.input_dim

    def forward(self, x: Tensor, beta: float = 1.0, kl: str = "analytic"):
        """The ELBO terms of a batch: ``model(x).loss()`` is the training loss."""
        return elbo(self, x, beta=beta, kl=kl)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means at z ~ p(z): (n, input_dim)."""
        return self.decoder.mean(self.prior.sample(n, generator=generator))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Decoder means at the encoder mean of each x."""
        mu = self.encoder(x)[0]  # the mean is the first stat of every q family
        return self.decoder.mean(mu)

    def extra_repr(self) -> str:
        return f"config={self.config}" if self.config else ""


def _full_covariance_encoder(arch: str, input_dim: int, latent_dim: int, hidden: Sequence[int],
                             activation: str) -> FullCovarianceEncoder:
    """The full-covariance q on the hidden layers the arch's diagonal encoder has (x itself for "linear")."""
    if arch == "linear":
        return FullCovarianceEncoder(input_dim, latent_dim, nn.Identity(), input_dim)
    features = mlp([input_dim, *hidden], activation, final_activation=True)
    return FullCovarianceEncoder(input_dim, latent_dim, features, hidden[-1] if hidden else input_dim)


def build_vae(
    arch: str = "mlp",
    input_dim: int = 784,
    latent_dim: int | None = None,
    hidden: Sequence[int] | int | None = None,
    activation: str | None = None,
    likelihood: str | None = None,
    sigma: float = 1.0,
    *,
    mean_activation: str = "identity",
    image_shape: Sequence[int] | None = None,
    posterior: str = "diagonal",
    prior: str = "standard",
    pseudo_inputs: int = 500,
) -> VAE:
    """Build a VAE from plain arguments (stored in ``model.config``, so ``build_vae(**model.config)`` rebuilds it).

    arch:
      * "mlp" — hidden widths ``hidden`` (default (400,)), ``activation`` (default relu), latent 20;
      * "conv" — two conv layers each way around ``hidden`` (default (256,)); needs a square image or
        ``image_shape``;
      * "linear" — linear encoder mean with a learned x-independent log-variance, linear decoder mean,
        Gaussian likelihood with a learned global sigma (the linear VAE of Lucas et al. 2019);
      * "burda" — Burda et al. (2015): 784-200-200-50, tanh, Bernoulli.
    likelihood: "bernoulli", "gaussian" (fixed ``sigma``), "gaussian-learned" (one learned sigma, initialised
      at ``sigma``), "gaussian-pixel" (one per pixel), "continuous-bernoulli".
    mean_activation: for Gaussian likelihoods, "identity" (any real data) or "sigmoid" (means in [0, 1]).
    posterior: the q family: "diagonal" (the arch's encoder, stats ``(mu, log_var)``) or "full"
      (:class:`FullCovarianceEncoder` on the arch's hidden layers, stats ``(mu, log_var, lower)``; for
      "linear" its features are x itself, so mean, log-diagonal and correlations are all linear in x;
      not available for "conv").
    prior: "standard" (N(0, I)) or "vamp" (:class:`VampPrior` with ``pseudo_inputs`` learned pseudo-inputs,
      drawn from the global RNG like the weights). Only a non-standard prior enters ``model.config``, so the
      configs of existing runs stay what they were.
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if isinstance(pseudo_inputs, bool) or not isinstance(pseudo_inputs, int) or pseudo_inputs < 1:
        raise ValueError(f"pseudo_inputs must be a positive integer, got {pseudo_inputs!r}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if isinstance(hidden, int):
        hidden = (hidden,)
    burda = arch == "burda"
    latent_dim = latent_dim if latent_dim is not None else (50 if burda else 20)
    hidden = tuple(int(h) for h in hidden) if hidden is not None else (
        (200, 200) if burda else (256,) if arch == "conv" else (400,))
    activation = activation or ("tanh" if burda else "relu")
    likelihood = likelihood or ("gaussian-learned" if arch == "linear" else "bernoulli")
    if input_dim < 1 or latent_dim < 1:
        raise ValueError(f"input_dim and latent_dim must be positive, got {input_dim} and {latent_dim}")
    if mean_activation not in ("identity", "sigmoid"):
        raise ValueError(f"mean_activation must be 'identity' or 'sigmoid', got {mean_activation!r}")
    if posterior not in POSTERIORS:
        raise ValueError(f"unknown posterior {posterior!r}; choose one of {', '.join(POSTERIORS)}")
    if posterior == "full" and arch == "conv":
        raise ValueError("posterior='full' is available for arch 'mlp', 'burda' and 'linear', not 'conv'")
    _activation(activation)
    lik = make_likelihood(likelihood, input_dim, sigma)
    gaussian = isinstance(lik, GaussianLikelihood)
    config = dict(arch=arch, input_dim=input_dim, latent_dim=latent_dim, hidden=list(hidden),
                  activation=activation, likelihood=likelihood, sigma=float(sigma), mean_activation=mean_activation)

    if arch in ("mlp", "burda"):
        encoder: Encoder = MLPEncoder(input_dim, latent_dim, hidden, activation)
        net: nn.Module = mlp([latent_dim, *reversed(hidden), input_dim], activation)
    elif arch == "linear":
        encoder = LinearEncoder(input_dim, latent_dim)
        net = nn.Linear(latent_dim, input_dim)
    else:
        if image_shape is None:
            side = math.isqrt(input_dim)
            if side * side != input_dim:
                raise ValueError(f"arch='conv' needs image_shape for input_dim {input_dim} (not a square)")
            image_shape = (1, side, side)
        image_shape = tuple(int(s) for s in image_shape)
        config["image_shape"] = list(image_shape)
        encoder = ConvEncoder(input_dim, latent_dim, image_shape, hidden, activation)
        net = _ConvDecoderNet(latent_dim, image_shape, tuple(reversed(hidden)), activation)
    if posterior == "full":
        config["posterior"] = posterior  # only when not the default, so older configs read the same
        encoder = _full_covariance_encoder(arch, input_dim, latent_dim, hidden, activation)
    if gaussian and mean_activation == "sigmoid":
        net = nn.Sequential(net, nn.Sigmoid())
    decoder = Decoder(net, lik, input_dim, latent_dim)
    if prior == "vamp":
        config.update(prior="vamp", pseudo_inputs=int(pseudo_inputs))
        return VAE(encoder, decoder, VampPrior(encoder, pseudo_inputs), config)
    return VAE(encoder, decoder, StandardNormalPrior(latent_dim), config)


__all__ = [
    "ACTIVATIONS", "ARCHS", "LIKELIHOODS", "POSTERIORS", "PRIORS", "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood", "ConvEncoder", "Decoder", "Encoder", "FullCovarianceEncoder", "GaussianLikelihood",
    "Likelihood", "LinearEncoder", "MLPEncoder", "StandardNormalPrior", "VAE", "VampPrior", "build_vae", "check_input",
    "make_likelihood", "mlp", "model_device", "model_dtype",
]
