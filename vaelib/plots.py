"""Figures for VAEs (matplotlib). Every function returns its Figure; call ``plt.show()`` in a notebook."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from vaelib.config import model_device
from vaelib.evaluation import encode_means


def _to_images(images, image_shape: Sequence[int] | None) -> np.ndarray:
    """(N, H, W) float array from (N, H*W), (N, H, W) or (N, 1, H, W) tensors/arrays."""
    arr = images.detach().cpu().float().numpy() if isinstance(images, Tensor) else np.asarray(images, dtype=float)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        if image_shape is None:
            side = math.isqrt(arr.shape[1])
            if side * side != arr.shape[1]:
                raise ValueError(f"cannot infer the image shape of {arr.shape[1]} pixels; pass image_shape")
            image_shape = (side, side)
        arr = arr.reshape(len(arr), *image_shape[-2:])
    if arr.ndim != 3:
        raise ValueError(f"images must be (N, H*W), (N, H, W) or (N, 1, H, W), got shape {arr.shape}")
    return arr


def _mosaic(arr: np.ndarray, nrow: int, ncol: int, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    n, h, w = arr.shape
    out = np.full((nrow * (h + pad) - pad, ncol * (w + pad) - pad), fill, dtype=float)
    for i in range(min(n, nrow * ncol)):
        r, c = divmod(i, ncol)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = arr[i]
    return out


def _new_axes(ax, figsize):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    return fig, ax


def image_grid(images, nrow: int | None = None, ncol: int | None = None, *, title: str | None = None,
               image_shape: Sequence[int] | None = None, ax=None, cmap: str = "gray",
               vmin: float | None = 0.0, vmax: float | None = 1.0, scale: float = 0.6) -> Figure:
    """Images side by side in a grid (one ``imshow``), ``ncol`` per row (default: close to square)."""
    arr = _to_images(images, image_shape)
    n = len(arr)
    if ncol is None:
        ncol = math.ceil(n / nrow) if nrow else math.ceil(math.sqrt(n))
    nrow = nrow or math.ceil(n / ncol)
    fig, ax = _new_axes(ax, (max(1.0, scale * ncol), max(1.0, scale * nrow)))
    ax.imshow(_mosaic(arr, nrow, ncol, fill=vmax if vmax is not None else float(arr.max())), cmap=cmap,
              vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


@torch.no_grad()
def plot_reconstructions(model, x: Tensor, n: int = 10, *, title: str = "Data (top) and reconstructions (bottom)",
                         image_shape: Sequence[int] | None = None) -> Figure:
    """The first ``n`` images of ``x`` over their reconstructions (decoder means at the encoder means)."""
    x = x[:n]
    device = model_device(model)
    rec = model.reconstruct(x.to(device)).cpu()
    both = torch.cat([x.detach().cpu().float(), rec.float()])
    return image_grid(both, nrow=2, ncol=len(x), title=title, image_shape=image_shape)


@torch.no_grad()
def plot_latent_manifold(model, n: int = 15, *, dims: tuple[int, int] = (0, 1), span: float | None = None,
                         title: str | None = None, image_shape: Sequence[int] | None = None) -> Figure:
    """Decoder means on an n x n grid of two latent coordinates (the others at 0).

    The grid is evenly spaced in probability (Gaussian quantiles 0.05 ... 0.95, as in Kingma & Welling 2013),
    or evenly spaced in [-span, span] when ``span`` is given.
    """
    if span is None:
        probs = torch.linspace(0.05, 0.95, n, dtype=torch.float64)
        values = torch.distributions.Normal(0.0, 1.0).icdf(probs).float()
    else:
        values = torch.linspace(-span, span, n)
    device = model_device(model)
    z = torch.zeros(n * n, model.latent_dim)
    rows, cols = torch.meshgrid(values.flip(0), values, indexing="ij")  # z_1 increases upwards
    z[:, dims[0]] = cols.reshape(-1)
    z[:, dims[1]] = rows.reshape(-1)
    images = model.decoder.mean(z.to(device)).cpu()
    return image_grid(images, nrow=n, ncol=n, image_shape=image_shape, scale=0.45,
                      title=title or f"Latent manifold (z{dims[0]} across, z{dims[1]} up)")


def plot_latent_scatter(model, x: Tensor, labels=None, *, dims: tuple[int, int] = (0, 1),
                        class_names: Sequence[str] | None = None, max_points: int = 5000,
                        title: str = "Encoder means", ax=None) -> Figure:
    """E_q[z|x] of each example in two latent coordinates, coloured by label."""
    x = x[:max_points]
    mu = encode_means(model, x).numpy()
    fig, ax = _new_axes(ax, (6, 5))
    if labels is None:
        ax.scatter(mu[:, dims[0]], mu[:, dims[1]], s=3, alpha=0.5)
    else:
        labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)[: len(mu)]
        cmap = plt.get_cmap("tab10")
        for i, c in enumerate(np.unique(labels)):
            sel = labels == c
            name = class_names[int(c)] if class_names is not None else str(c)
            ax.scatter(mu[sel, dims[0]], mu[sel, dims[1]], s=3, alpha=0.6, color=cmap(i % 10), label=name)
        ax.legend(markerscale=4, fontsize="small", loc="best")
    ax.set_xlabel(f"$z_{{{dims[0]}}}$")
    ax.set_ylabel(f"$z_{{{dims[1]}}}$")
    ax.set_title(title)
    return fig


@torch.no_grad()
def plot_traversals(model, x: Tensor | None = None, *, z: Tensor | None = None, dims: Sequence[int] | None = None,
                    n_steps: int = 9, span: float = 3.0, title: str = "Latent traversals",
                    image_shape: Sequence[int] | None = None) -> Figure:
    """One row per latent dimension: decoder means as that coordinate sweeps [-span, span], the others fixed
    at the encoding of ``x[0]`` (or at ``z``, or at 0)."""
    device = model_device(model)
    if z is None:
        z = model.encoder(x[:1].to(device))[0][0] if x is not None else torch.zeros(model.latent_dim, device=device)
    z = z.reshape(-1).to(device)
    dims = list(range(min(model.latent_dim, 10))) if dims is None else list(dims)
    values = torch.linspace(-span, span, n_steps, device=device)
    grid = z.repeat(len(dims) * n_steps, 1)
    for r, d in enumerate(dims):
        grid[r * n_steps:(r + 1) * n_steps, d] = values
    images = model.decoder.mean(grid).cpu()
    fig = image_grid(images, nrow=len(dims), ncol=n_steps, image_shape=image_shape, title=title)
    ax = fig.axes[0]
    ax.set_axis_on()
    ax.set_xticks([])
    h = _to_images(images[:1], image_shape).shape[1]
    ax.set_yticks([r * (h + 1) + h / 2 for r in range(len(dims))], [f"z{d}" for d in dims])
    ax.set_xlabel(f"value from {-span:g} to {span:g}")
    return fig


def plot_training_curves(history: Sequence[dict], *, title: str | None = None) -> Figure:
    """Loss (train loss and test -ELBO) and KL per epoch; the KL weight beta too when it changes."""
    if not history:
        raise ValueError("history is empty")
    epochs = [row["epoch"] for row in history]
    betas = [row.get("beta", 1.0) for row in history]
    show_beta = len(set(betas)) > 1
    fig, axes = plt.subplots(1, 3 if show_beta else 2, figsize=(12 if show_beta else 9, 3.5))
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    if "test_elbo" in history[0]:
        ax.plot(epochs, [-r["test_elbo"] for r in history], label="test -ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.set_title("Loss")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [r["train_kl"] for r in history], label="train KL")
    if "test_kl" in history[0]:
        ax.plot(epochs, [r["test_kl"] for r in history], label="test KL")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.set_title("KL(q(z|x) || p(z))")
    ax.legend()
    if show_beta:
        axes[2].plot(epochs, betas)
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel(r"$\beta$")
        axes[2].set_title("KL weight")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


__all__ = ["image_grid", "plot_latent_manifold", "plot_latent_scatter", "plot_reconstructions",
           "plot_training_curves", "plot_traversals"]
