"""Figures of a run: loss curves, accuracy, samples per cluster, and the 2-D plots.

Figures are built with matplotlib's object-oriented API (``Figure``, no pyplot state), so
they render without a display and importing this module never switches a notebook's
backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from matplotlib.ticker import MaxNLocator

from pyro_gmvae.posterior import assign, components, encode, reconstruct, sample

TERMS = ("recon", "cond_prior", "w_prior", "z_prior", "cv")


def _figure(*grid, figsize, **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def _cmap(num_clusters: int):
    return matplotlib.colormaps["tab10" if num_clusters <= 10 else "tab20"]


def _epoch_axis(ax, epochs) -> None:
    ax.set_xlabel("epoch")
    if len(epochs) <= 10:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_losses(history: list[dict], path: Path) -> None:
    """Every logged term per epoch, one panel each, plus the train loss and test ELBO."""
    epochs = [row["epoch"] for row in history]
    names = ["train_loss", "test_elbo", *TERMS]
    num_cols = 4
    num_rows = -(-len(names) // num_cols)
    fig, axes = _figure(num_rows, num_cols, figsize=(3 * num_cols, 2.6 * num_rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):  # spare panels stay hidden
        ax.plot(epochs, [row[name] for row in history], marker="." if len(epochs) < 30 else None)
        ax.set_title(name)
        _epoch_axis(ax, epochs)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    fig.suptitle("per-example terms (test split, except train_loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_accuracy(history: list[dict], path: Path) -> None:
    """Test accuracies and NMI per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, ax = _figure(figsize=(5, 3.5))
    for name in ("acc_paper", "acc_hungarian", "purity", "nmi"):
        ax.plot(epochs, [row[name] for row in history], label=name, marker="." if len(epochs) < 30 else None)
    _epoch_axis(ax, epochs)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("test clustering metrics")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_sample_grid(model, path: Path, num_samples: int = 10) -> None:
    """The paper's figure: one row per cluster, w fixed at 0, ``num_samples`` x draws decoded."""
    num_clusters = model.prior.num_clusters
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    rows = [sample(model, k, num_samples, generator=gen) for k in range(num_clusters)]  # (S, C, H, W)
    fig, axes = _figure(num_clusters, num_samples, figsize=(num_samples * 0.8, num_clusters * 0.8))
    axes = np.atleast_2d(axes)
    for k, images in enumerate(rows):
        for j, image in enumerate(images):
            ax = axes[k, j]
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[k, 0].set_ylabel(str(k), rotation=0, labelpad=10)
    fig.suptitle("one row per cluster k: mean of p(y | x), x ~ p(x | z=k, w=0)")
    fig.savefig(path, dpi=100)


def plot_samples_2d(model, path: Path, num_samples: int = 200) -> None:
    """2-D data: draws from each cluster at w = 0, coloured by cluster."""
    cmap = _cmap(model.prior.num_clusters)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    fig, ax = _figure(figsize=(5, 5))
    for k in range(model.prior.num_clusters):
        points = sample(model, k, num_samples, generator=gen).numpy()
        ax.scatter(points[:, 0], points[:, 1], s=3, color=cmap(k % cmap.N), label=str(k))
    ax.set_aspect("equal")
    ax.legend(markerscale=4, fontsize=7, title="cluster")
    ax.set_title("samples per cluster (w = 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_latent_2d(model, guide, y: torch.Tensor, path: Path) -> None:
    """Posterior means of x coloured by cluster, with a 2-sigma ellipse per component at w = 0."""
    q = encode(guide, y)
    clusters = assign(model, guide, y).numpy()
    loc, scale = components(model)  # (K, Dx) at w = 0
    cmap = _cmap(model.prior.num_clusters)
    x = q["x_loc"][:, :2].numpy()
    fig, ax = _figure(figsize=(5, 5))
    ax.scatter(x[:, 0], x[:, 1], s=3, c=[cmap(c % cmap.N) for c in clusters])
    for k in range(model.prior.num_clusters):
        ellipse = Ellipse(
            loc[k, :2].numpy(),
            4 * scale[k, 0].item(),
            4 * scale[k, 1].item(),
            fill=False,
            color=cmap(k % cmap.N),
            lw=1.5,
        )
        ax.add_patch(ellipse)
    ax.set_title("latent x (posterior means) and components at w = 0")
    ax.autoscale()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_reconstruction_2d(model, guide, y: torch.Tensor, path: Path) -> None:
    """Data in grey, reconstructions coloured by cluster."""
    recon = reconstruct(model, guide, y).numpy()
    clusters = assign(model, guide, y).numpy()
    cmap = _cmap(model.prior.num_clusters)
    fig, ax = _figure(figsize=(5, 5))
    ax.scatter(y[:, 0].numpy(), y[:, 1].numpy(), s=3, color="0.75", label="data")
    ax.scatter(recon[:, 0], recon[:, 1], s=3, c=[cmap(c % cmap.N) for c in clusters])
    ax.set_aspect("equal")
    ax.set_title("data (grey) and reconstructions by cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def make_run_figures(out: Path, model, guide, data, history: list[dict]) -> list[Path]:
    """Write every figure that fits the data to ``out/figures``; return their paths."""
    folder = Path(out) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "losses.png"]
    plot_losses(history, written[-1])
    if "acc_hungarian" in history[-1]:
        written.append(folder / "accuracy.png")
        plot_accuracy(history, written[-1])
    if len(data.data_shape) == 3:
        written.append(folder / "samples.png")
        plot_sample_grid(model, written[-1])
    elif data.data_shape == (2,):
        written.append(folder / "samples.png")
        plot_samples_2d(model, written[-1])
        if model.prior.x_dim >= 2:  # the latent plot shows the first two dimensions of x
            written.append(folder / "latent.png")
            plot_latent_2d(model, guide, data.x_test, written[-1])
        written.append(folder / "reconstruction.png")
        plot_reconstruction_2d(model, guide, data.x_test, written[-1])
    return written
