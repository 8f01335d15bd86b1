"""Posterior queries on a trained model and guide.

Every function here runs in eval mode under ``torch.inference_mode()``, restores the
modules' previous mode, stores nothing on them, and works through the data in batches so a
whole data set fits in memory.  Shapes: N examples, K clusters, Dx / Dw latent sizes.
"""

from __future__ import annotations

import contextlib

import pyro
import torch
from pyro import poutine
from pyro.infer import infer_discrete

from pyro_gmvae.metrics import clustering_metrics
from pyro_gmvae.objective import elbo_terms


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


def model_and_guide(source) -> tuple:
    """A Run (anything with ``model`` and ``guide``) or a (model, guide) pair, as the pair."""
    if hasattr(source, "model") and hasattr(source, "guide"):
        return source.model, source.guide
    if isinstance(source, tuple | list) and len(source) == 2:
        return source[0], source[1]
    raise TypeError(f"expected a Run or a (model, guide) pair, got {type(source).__name__}")


def _parameter(module) -> torch.Tensor:
    # Constants follow the model's device and dtype (float32, or float64 after .double()).
    return next(module.parameters())


def _device_of(module) -> torch.device:
    return _parameter(module).device


def _batches(y: torch.Tensor, batch_size: int, device):
    for start in range(0, len(y), batch_size):
        yield y[start : start + batch_size].to(device)


def cluster_probs(
    model,
    guide,
    y: torch.Tensor,
    num_samples: int = 0,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cluster probabilities, shape (N, K).

    v2 guide: p(z | x, w) at the posterior means of x and w (``num_samples=0``) or averaged
    over ``num_samples`` draws from q(x|y) q(w|y).  v1 guide: q(z | y).  ``generator``
    (on the model's device) makes the averaged version reproducible without touching the
    global RNG.
    """
    device = _device_of(guide)
    out = []
    with evaluating(model, guide):
        for batch in _batches(y, batch_size, device):
            q = guide.encode(batch)
            if num_samples == 0:
                out.append(guide.cluster_log_probs(model, q).exp())  # at the posterior means
                continue
            shape = (num_samples,) + q["w_loc"].shape
            noise = torch.randn(shape, device=device, dtype=q["w_loc"].dtype, generator=generator)
            w = q["w_loc"] + q["w_scale"] * noise  # (S, B, Dw)
            shape = (num_samples,) + q["x_loc"].shape
            noise = torch.randn(shape, device=device, dtype=q["x_loc"].dtype, generator=generator)
            x = q["x_loc"] + q["x_scale"] * noise  # (S, B, Dx)
            probs = guide.cluster_log_probs(model, q, x, w).exp()  # (S, B, K), or (B, K) for q(z|y)
            out.append(probs.mean(0) if probs.dim() == 3 else probs)
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
            w = _parameter(model).new_zeros(model.prior.w_dim)
        loc, scale = model.prior.components(w.to(device))
    return loc.cpu(), scale.cpu()


def sample(
    model,
    cluster: int,
    num_samples: int = 10,
    w: torch.Tensor | str | None = None,
    mean: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws from cluster ``cluster``: x ~ p(x | z=cluster, w), then y from p(y | x).

    ``w`` fixed (shape (Dw,); default 0, like the paper's figures) or ``"prior"`` to draw
    w ~ N(0, I) per sample.  With ``mean=True`` return the mean of p(y | x) (the usual
    image grid) rather than a draw.  Shape (num_samples, *data_shape).
    """
    if not 0 <= cluster < model.prior.num_clusters:
        raise ValueError(f"cluster must be in 0..{model.prior.num_clusters - 1}, got {cluster}")
    device, dtype = _device_of(model), _parameter(model).dtype
    with evaluating(model):
        if isinstance(w, str) and w == "prior":
            w = torch.randn(num_samples, model.prior.w_dim, device=device, dtype=dtype, generator=generator)
        elif w is None:
            w = _parameter(model).new_zeros(num_samples, model.prior.w_dim)
        else:
            w = w.to(device).expand(num_samples, model.prior.w_dim)
        loc, scale = model.prior.components(w)  # (S, K, Dx)
        noise = torch.randn(loc[:, cluster].shape, device=device, dtype=dtype, generator=generator)
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


def evaluate(model, guide, data) -> dict:
    """Mean ELBO terms and clustering metrics on the test split of ``data`` (a Dataset)."""
    terms = elbo_terms_dataset(model, guide, data.x_test)
    out = {name: float(value.mean()) for name, value in terms.items()}
    out.update(clustering_metrics(cluster_probs(model, guide, data.x_test), data.labels_test))
    return out


def _draws(fn, num_samples: int):
    """``fn`` with an outer ``"draws"`` plate at dim -2, so every site gets S draws at once."""

    def vectorized(y):
        with pyro.plate("draws", num_samples, dim=-2):
            return fn(y)

    return vectorized


def posterior_draws(model, guide, y: torch.Tensor, num_samples: int = 100, batch_size: int = 256) -> dict:
    """Joint posterior draws of (w, x, z) for every example, with what they imply.

    (w, x) come from the guide; z is then drawn by Pyro's ``infer_discrete`` from the model
    conditioned on those (w, x), which gives z ~ p(z | x, w, y) = p(z | x, w) for the v2
    guide (the model enumerates z); the v1 guide samples z from its own q(z | y) and the
    model is conditioned on it too.  All S draws of a batch run at once under an outer
    ``"draws"`` plate.  Uses the global torch RNG (seed with ``pyro.set_rng_seed``).

    Returns
    -------
    dict of Tensor (on the CPU)
        ``w`` (S, N, Dw), ``x`` (S, N, Dx), ``z`` (S, N) int64, ``cluster_probs`` (S, N, K)
        (p(z | x_s, w_s) for v2, q(z | y) for v1) and ``log_likelihood`` (S, N), the
        per-example log p(y | x_s).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    parts: dict[str, list] = {}
    device = _device_of(guide)
    with evaluating(model, guide):
        for batch in _batches(y, batch_size, device):
            guide_trace = poutine.trace(_draws(guide, num_samples)).get_trace(batch)
            w = guide_trace.nodes["w"]["value"]  # (S, B, Dw)
            x = guide_trace.nodes["x"]["value"]  # (S, B, Dx)
            given = {"w": w, "x": x}
            if "z" in guide_trace.nodes:  # v1: z comes from q(z | y)
                given["z"] = guide_trace.nodes["z"]["value"]
            # Condition inside infer_discrete (it blocks handlers around it), and condition
            # rather than replay: infer_discrete re-packs latent sites downstream of z as if
            # they had no event dimension, while observed sites are left alone.  The outer
            # "draws" plate takes dim -2 and "data" dim -1, so enumeration starts at -3.
            conditioned = poutine.condition(_draws(model, num_samples), data=given)
            if "z" not in given:
                conditioned = infer_discrete(conditioned, first_available_dim=-3, temperature=1)
            model_trace = poutine.trace(conditioned).get_trace(batch)
            z = model_trace.nodes["z"]["value"]  # (S, B)
            log_r = guide.cluster_log_probs(model, guide.encode(batch), x, w)
            probs = log_r.exp().expand(num_samples, -1, -1)  # (S, B, K)
            log_lik = model_trace.nodes["y"]["fn"].log_prob(batch)  # (S, B)
            for key, value in dict(w=w, x=x, z=z, cluster_probs=probs, log_likelihood=log_lik).items():
                parts.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(values, dim=1) for key, values in parts.items()}
