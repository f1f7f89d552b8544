"""Plots: each function returns a Figure with the expected content."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vaelib.models import build_vae  # noqa: E402
from vaelib.plots import (  # noqa: E402
    image_grid,
    plot_latent_manifold,
    plot_latent_scatter,
    plot_reconstructions,
    plot_training_curves,
    plot_traversals,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_vae(latent_dim=3, hidden=(8,)).eval()


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_image_grid_shapes():
    fig = image_grid(torch.rand(10, 784), ncol=5, title="t")
    assert isinstance(fig, Figure)
    assert fig.axes[0].images[0].get_array().shape == (2 * 29 - 1, 5 * 29 - 1)
    assert isinstance(image_grid(torch.rand(4, 1, 28, 28)), Figure)
    assert isinstance(image_grid(torch.rand(3, 6), image_shape=(2, 3)), Figure)
    with pytest.raises(ValueError, match="image_shape"):
        image_grid(torch.rand(3, 10))


def test_model_figures(model):
    x = torch.rand(40, 784)
    labels = torch.arange(40) % 4
    figs = [
        plot_reconstructions(model, x, n=6),
        plot_latent_manifold(model, n=5),
        plot_latent_manifold(model, n=4, span=2.0, dims=(1, 2)),
        plot_latent_scatter(model, x, labels, class_names=["a", "b", "c", "d"]),
        plot_latent_scatter(model, x),
        plot_traversals(model, x, n_steps=5),
        plot_traversals(model, dims=[0, 2], n_steps=4),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    assert figs[0].axes[0].images[0].get_array().shape == (2 * 29 - 1, 6 * 29 - 1)
    assert [t.get_text() for t in figs[3].axes[0].get_legend().get_texts()] == ["a", "b", "c", "d"]
    assert [t.get_text() for t in figs[6].axes[0].get_yticklabels()] == ["z0", "z2"]


def test_training_curves():
    history = [dict(epoch=e, train_loss=10.0 / e, train_rec=-9.0, train_kl=1.0, test_elbo=-10.0 / e, test_rec=-9.0,
                    test_kl=1.0, beta=min(1.0, e / 3), seconds=0.1) for e in range(1, 6)]
    fig = plot_training_curves(history, title="run")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert len(plot_training_curves([{k: v for k, v in r.items() if k != "beta"} for r in history]).axes) == 2
    with pytest.raises(ValueError):
        plot_training_curves([])
