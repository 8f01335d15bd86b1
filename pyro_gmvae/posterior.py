"""Posterior queries on a trained model and guide.

Every function here runs in eval mode under ``torch.inference_mode()``, restores the
modules' previous mode, stores nothing on them, and works through the data in batches so a
whole data set fits in memory.  Shapes: N examples, K clusters, Dx / Dw latent sizes.
"""

from __future__ import annotations

import contextlib

import torch

from pyro_gmvae.objective import cluster_log_posterior, elbo_terms


@contextlib.contextmanager
def evaluating(*modules):
    """Eval mode and inference mode for the block; previous modes come back after."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def _batches(y: torch.Tensor, batch_size: int, device):
    for start in range(0, len(y), batch_size):
        yield y[start : start + batch_size].to(device)


def cluster_probs(model, guide, y: torch.Tensor, num_samples: int = 0, batch_size: int = 1000) -> torch.Tensor:
    """Cluster probabilities, shape (N, K).

    v2 guide: p(z | x, w) at the posterior means of x and w (``num_samples=0``) or averaged
    over ``num_samples`` draws from q(x|y) q(w|y).  v1 guide: q(z | y).
    """
    device = _device_of(guide)
    out = []
    with evaluating(model, guide):
        for batch in _batches(y, batch_size, device):
            q = guide.encode(batch)
            if guide.cluster_posterior == "guide":
                out.append(torch.softmax(q["z_logits"], -1))
                continue
            log_pi = model.prior.cluster_log_weights()
            if num_samples == 0:
                w, x = q["w_loc"], q["x_loc"]
            else:
                shape = (num_samples,) + q["w_loc"].shape
                w = q["w_loc"] + q["w_scale"] * torch.randn(shape, device=device, dtype=q["w_loc"].dtype)
                shape = (num_samples,) + q["x_loc"].shape
                x = q["x_loc"] + q["x_scale"] * torch.randn(shape, device=device, dtype=q["x_loc"].dtype)
            loc, scale = model.prior.components(w)
            probs = cluster_log_posterior(log_pi, loc, scale, x).exp()
            out.append(probs if num_samples == 0 else probs.mean(0))
    return torch.cat(out).cpu()


def assign(model, guide, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """Hard cluster assignments (N,), the argmax of :func:`cluster_probs`."""
    return cluster_probs(model, guide, y, **kwargs).argmax(-1)


def encode(guide, y: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """Posterior locations and scales: ``x_loc``, ``x_scale`` (N, Dx), ``w_loc``, ``w_scale`` (N, Dw)
    (and ``z_logits`` (N, K) for the v1 guide)."""
    parts: dict[str, list] = {}
    with evaluating(guide):
        for batch in _batches(y, batch_size, _device_of(guide)):
            for key, value in guide.encode(batch).items():
                parts.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def reconstruct(model, guide, y: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Mean of p(y | x) at x = the posterior mean of q(x | y), shape (N, *data_shape)."""
    out = []
    with evaluating(model, guide):
        for batch in _batches(y, batch_size, _device_of(guide)):
            x = guide.encode(batch)["x_loc"]
            out.append(model.likelihood.mean(model.decoder(x), len(model.data_shape)).cpu())
    return torch.cat(out)


def components(model, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Locations and scales of the K components of p(x | z, w), each (..., K, Dx).

    ``w`` defaults to the prior mean 0 (shape (Dw,)), the paper's choice for its figures.
    """
    device = _device_of(model)
    with evaluating(model):
        if w is None:
            w = torch.zeros(model.prior.w_dim, device=device)
        loc, scale = model.prior.components(w.to(device))
    return loc.cpu(), scale.cpu()


def sample(model, cluster: int, num_samples: int = 10, w: torch.Tensor | None = None, mean: bool = True,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws from cluster ``cluster``: x ~ p(x | z=cluster, w), then y from p(y | x).

    ``w`` fixed (shape (Dw,); default 0, like the paper's figures) or ``"prior"`` to draw
    w ~ N(0, I) per sample.  With ``mean=True`` return the mean of p(y | x) (the usual
    image grid) rather than a draw.  Shape (num_samples, *data_shape).
    """
    if not 0 <= cluster < model.prior.num_clusters:
        raise ValueError(f"cluster must be in 0..{model.prior.num_clusters - 1}, got {cluster}")
    device = _device_of(model)
    with evaluating(model):
        if isinstance(w, str) and w == "prior":
            w = torch.randn(num_samples, model.prior.w_dim, device=device, generator=generator)
        elif w is None:
            w = torch.zeros(num_samples, model.prior.w_dim, device=device)
        else:
            w = w.to(device).expand(num_samples, model.prior.w_dim)
        loc, scale = model.prior.components(w)  # (S, K, Dx)
        noise = torch.randn(loc[:, cluster].shape, device=device, generator=generator)
        x = loc[:, cluster] + scale[:, cluster] * noise
        p_y = model.p_y(x)
        y = model.likelihood.mean(model.decoder(x), len(model.data_shape)) if mean else p_y.sample()
    return y.cpu()


def elbo_terms_dataset(model, guide, y: torch.Tensor, num_particles: int = 1, batch_size: int = 1000) -> dict:
    """Per-example ELBO terms (see :func:`pyro_gmvae.objective.elbo_terms`) for a whole data set,
    in eval mode; each value has shape (N,)."""
    parts: dict[str, list] = {}
    with evaluating(model, guide):
        for batch in _batches(y, batch_size, _device_of(guide)):
            for key, value in elbo_terms(model, guide, batch, num_particles).items():
                parts.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(values) for key, values in parts.items()}
