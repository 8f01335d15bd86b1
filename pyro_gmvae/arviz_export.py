"""Posterior draws of a trained GMVAE as an ArviZ ``InferenceData``.

One chain of S draws per example, from :func:`pyro_gmvae.posterior.posterior_draws` ((w, x)
from the guide, z from Pyro's ``infer_discrete`` on the model conditioned on them):

==================  ===================================  ==========================================
group / variable    dims                                 meaning
==================  ===================================  ==========================================
posterior.w         (chain, draw, example, w_dim)        w ~ q(w | y)
posterior.x         (chain, draw, example, x_dim)        x ~ q(x | y)
posterior.z         (chain, draw, example)               z ~ p(z | x, w) (v2) or q(z | y) (v1)
posterior.          (chain, draw, example, cluster)      p(z | x, w) at each draw (v2), q(z | y) (v1)
cluster_probs
log_likelihood.y    (chain, draw, example)               log p(y | x) per example
observed_data.y     (example, y_dim_0, ...)              the examples themselves
==================  ===================================  ==========================================

Coordinates: ``example`` (0..N-1 or the ids given), ``cluster`` (0..K-1), ``x_dim``
(0..Dx-1), ``w_dim`` (0..Dw-1), ``chain`` (0).  ``az.summary(idata, kind="stats")``,
``az.plot_forest`` and friends work on it; select with e.g.
``idata.posterior["cluster_probs"].sel(example=3)``.

The draws are independent, not a Markov chain, so ArviZ's chain diagnostics tell nothing
here: ``az.summary``'s default ``kind="all"`` adds ESS, MCSE and r_hat (NaN: one chain,
which ArviZ logs as a failed shape check) and, for a variable that is the same in every
draw (a cluster probability saturated at exactly 0 or 1, common after training), divides
0 by 0 with a RuntimeWarning per such entry.  ``kind="stats"`` (mean, sd, HDI) is the
summary to ask for.
"""

from __future__ import annotations

import numpy as np
import torch

from pyro_gmvae.posterior import model_and_guide, posterior_draws


def to_inference_data(source, y, num_samples: int = 100, batch_size: int = 256, example_ids=None):
    """Export S posterior draws for a batch of examples as an ArviZ ``InferenceData``.

    Parameters
    ----------
    source : Run or (model, guide)
        The trained model and guide.
    y : Tensor or array, shape (N, *data_shape)
        The examples to describe; keep N modest (every draw of every example is stored).
    num_samples : int
        S, draws per example (one chain).
    batch_size : int
        Examples per vectorised pass.
    example_ids : sequence, optional
        Coordinates of the ``example`` dimension (default 0..N-1), e.g. indices into the
        test split.

    Returns
    -------
    arviz.InferenceData
        Groups ``posterior`` (``w``, ``x``, ``z``, ``cluster_probs``), ``log_likelihood``
        (``y``) and ``observed_data`` (``y``); dims and coords as in the module docstring.
    """
    import arviz as az

    model, guide = model_and_guide(source)
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y, dtype=torch.float32)
    draws = posterior_draws(model, guide, y, num_samples=num_samples, batch_size=batch_size)
    num_examples = len(y)
    data_dims = [f"y_dim_{i}" for i in range(y.dim() - 1)]
    coords = {
        "example": np.arange(num_examples) if example_ids is None else np.asarray(example_ids),
        "cluster": np.arange(draws["cluster_probs"].shape[-1]),
        "x_dim": np.arange(draws["x"].shape[-1]),
        "w_dim": np.arange(draws["w"].shape[-1]),
    }
    if len(coords["example"]) != num_examples:
        raise ValueError(f"example_ids has {len(coords['example'])} entries for {num_examples} examples")
    dims = {
        "w": ["example", "w_dim"],
        "x": ["example", "x_dim"],
        "z": ["example"],
        "cluster_probs": ["example", "cluster"],
        "y": ["example", *data_dims],
    }

    def chain(name):  # add the single chain: (S, N, ...) -> (1, S, N, ...)
        return draws[name].numpy()[None]

    return az.from_dict(
        posterior={name: chain(name) for name in ("w", "x", "z", "cluster_probs")},
        log_likelihood={"y": chain("log_likelihood")},
        observed_data={"y": y.detach().cpu().numpy()},
        coords=coords,
        dims=dims,
        attrs={"inference_library": "pyro", "guide": type(guide).__name__, "num_clusters": coords["cluster"].size},
    )
