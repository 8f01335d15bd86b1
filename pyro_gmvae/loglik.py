"""Held-out log-likelihood log p(y) by importance sampling, the cluster variable summed exactly.

The guide's q(x|y) q(w|y) is the proposal.  For each example y and S independent draws
(x_s, w_s) ~ q(x|y) q(w|y)::

    log p(y) ~= log (1/S) sum_s exp(l_s)

    l_s = log p(y | x_s)
        + log sum_k pi_k N(x_s; mu_k(w_s), diag sigma_k(w_s)^2)      (z summed exactly)
        + log p(w_s)
        - log q(x_s | y) - log q(w_s | y)

This is the importance-weighted bound of Burda et al. (2016): its expectation is below
log p(y) and rises with S towards it; at S = 1 it is, in expectation, the ELBO with z
summed out (for the v2 guide exactly the ELBO it trains; the v1 guide's q(z|y) head is
not used here, so for v1 the S = 1 value is at or above its training ELBO).

The S draws are taken in chunks and folded in with a streaming log-sum-exp, and the data
in batches of examples, so the peak memory stays within ``memory_budget`` for any S.  The
pieces come from the model's and guide's own methods (``model.p_y``, ``model.p_w``,
``model.prior.components``, ``model.prior.cluster_log_weights``, ``guide.encode``), so a
swapped prior or likelihood is scored by its own densities.

Shapes: N examples, S importance samples, K clusters, Dx / Dw latent sizes.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from pyro_gmvae.errors import UserInputError
from pyro_gmvae.posterior import evaluating, model_and_guide

#: Default peak memory for the per-sample intermediate tensors of one chunk (bytes).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def _as_data(y) -> torch.Tensor:
    if hasattr(y, "x_test") and not isinstance(y, torch.Tensor):  # a pyro_gmvae.data.Dataset
        y = y.x_test
    return y if isinstance(y, torch.Tensor) else torch.as_tensor(y)


def log_weights(model, guide, y: torch.Tensor, num_samples: int, generator: torch.Generator | None = None):
    """Log importance weights l_s of the module docstring for one batch.

    Runs as called (no mode changes); the caller picks eval and inference mode.

    Parameters
    ----------
    model, guide
        A GMVAE model and a guide whose ``encode`` gives ``x_loc``, ``x_scale``, ``w_loc``,
        ``w_scale``.
    y : Tensor, shape (B, *data_shape)
        On the modules' device, in their dtype.
    num_samples : int
        S, draws per example.
    generator : torch.Generator, optional
        Source of the draws (on the modules' device); default the global RNG.

    Returns
    -------
    Tensor, shape (S, B)
    """
    q = guide.encode(y)
    batch = y.shape[0]
    q_x = dist.Normal(q["x_loc"], q["x_scale"])  # (B, Dx)
    q_w = dist.Normal(q["w_loc"], q["w_scale"])  # (B, Dw)
    # Draws by hand (not rsample), so a generator can make them reproducible.
    eps_w = torch.randn((num_samples,) + q["w_loc"].shape, generator=generator, device=y.device, dtype=y.dtype)
    eps_x = torch.randn((num_samples,) + q["x_loc"].shape, generator=generator, device=y.device, dtype=y.dtype)
    w = q["w_loc"] + q["w_scale"] * eps_w  # (S, B, Dw)
    x = q["x_loc"] + q["x_scale"] * eps_x  # (S, B, Dx)

    loc, scale = model.prior.components(w)  # (S, B, K, Dx) each
    log_components = dist.Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)  # (S, B, K)
    log_mixture = torch.logsumexp(model.prior.cluster_log_weights() + log_components, -1)  # (S, B)
    log_p_w = model.p_w(batch).log_prob(w)  # (S, B)
    log_p_y = model.p_y(x).log_prob(y)  # (S, B)
    log_q = q_x.log_prob(x).sum(-1) + q_w.log_prob(w).sum(-1)  # (S, B)
    return log_p_y + log_mixture + log_p_w - log_q


def _bytes_per_draw(model, guide, example: torch.Tensor) -> int:
    """Bytes of intermediate tensors for one (draw, example) pair, measured once.

    Runs :func:`log_weights` on one example with one draw and adds up the sizes of every
    submodule's output (an upper bound on what is alive at once), plus a few data-sized
    tensors for the likelihood's elementwise log-density.
    """
    sizes = []

    def hook(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())
            elif hasattr(t, "batch_shape"):  # a distribution: count its data-sized result
                sizes.append(example.numel() * example.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        log_weights(model, guide, example, 1)
    finally:
        for handle in handles:
            handle.remove()
    data_bytes = example.numel() * example.element_size()
    return max(1, sum(sizes) + 4 * data_bytes)


def loglik(
    run_or_model_guide,
    y,
    num_samples: int = 1000,
    batch_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    generator: torch.Generator | None = None,
    progress: bool = True,
    return_mc_stderr: bool = False,
):
    """Importance-sampled log p(y) per example, z summed exactly (formula: module docstring).

    Parameters
    ----------
    run_or_model_guide : Run or (model, guide)
        A loaded run (:func:`pyro_gmvae.load_run`) or a GMVAE model and its guide.
    y : Tensor or array, shape (N, *data_shape)
        The examples (a :class:`~pyro_gmvae.data.Dataset` means its ``x_test``).  Moved to
        the modules' device and dtype batch by batch.
    num_samples : int
        S, importance samples per example; 5000 is the literature's setting.
    batch_size : int, optional
        Examples per pass.  Default: as many as fit ``memory_budget`` with 32 draws each,
        at most 1000.
    memory_budget : int
        Bytes the intermediate tensors of one chunk (examples x draws) may take; the draws
        per chunk follow from it.  A measured upper bound, not a hard cap on the process.
    generator : torch.Generator, optional
        Source of the draws, on the modules' device; default the global torch RNG.
    progress : bool
        Show a tqdm bar over the examples x draws done.
    return_mc_stderr : bool
        Also return each estimate's Monte Carlo standard error (delta method:
        sd(exp l_s) / (sqrt(S) mean(exp l_s))); NaN for S = 1.  It understates the error
        when the weights are heavy-tailed, so take it as a diagnostic.

    Returns
    -------
    Tensor, shape (N,)
        log p(y_n) estimates in nats, on the CPU, in the modules' dtype.  With
        ``return_mc_stderr`` a pair ``(estimates, mc_stderr)``, both (N,).

    Raises
    ------
    UserInputError
        S < 1, a batch size or budget < 1, or data whose shape does not match the model.

    Notes
    -----
    Runs in eval mode under ``torch.inference_mode()``; the modules' previous modes come
    back afterwards.
    """
    model, guide = model_and_guide(run_or_model_guide)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise UserInputError(f"the number of importance samples must be an integer >= 1, got {num_samples}")
    if batch_size is not None and batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    if memory_budget < 1:
        raise UserInputError(f"memory_budget must be >= 1 byte, got {memory_budget}")
    y = _as_data(y)
    data_shape = tuple(getattr(model, "data_shape", y.shape[1:]))
    if y.dim() < 1 or tuple(y.shape[1:]) != data_shape:
        raise UserInputError(f"data of shape {tuple(y.shape)} does not fit a model of examples {data_shape}")
    param = next(guide.parameters())
    device, dtype = param.device, param.dtype
    num_examples = y.shape[0]
    estimates, stderrs = [], []
    with evaluating(model, guide):
        if num_examples == 0:
            empty = torch.empty(0, dtype=dtype)
            return (empty, empty.clone()) if return_mc_stderr else empty
        per_draw = _bytes_per_draw(model, guide, y[:1].to(device=device, dtype=dtype))
        fit = max(1, memory_budget // per_draw)  # (draw, example) pairs per chunk
        if batch_size is None:
            batch_size = int(min(1000, max(1, fit // min(32, num_samples))))
        batch_size = min(batch_size, num_examples)
        chunk = int(min(num_samples, max(1, fit // batch_size)))
        bar = tqdm(
            total=num_examples * num_samples,
            disable=not progress,
            desc=f"log p(y), S={num_samples}",
            unit="draw",
            unit_scale=True,
            mininterval=0.5,
        )
        for start in range(0, num_examples, batch_size):
            batch = y[start : start + batch_size].to(device=device, dtype=dtype)
            log_sum = torch.full((batch.shape[0],), -math.inf, device=device, dtype=dtype)  # log sum_s e^l
            log_sum_sq = log_sum.clone()  # log sum_s e^(2 l), for the delta-method error
            done = 0
            while done < num_samples:
                draws = min(chunk, num_samples - done)
                lw = log_weights(model, guide, batch, draws, generator)  # (draws, B)
                log_sum = torch.logaddexp(log_sum, torch.logsumexp(lw, 0))
                if return_mc_stderr:
                    log_sum_sq = torch.logaddexp(log_sum_sq, torch.logsumexp(2 * lw, 0))
                done += draws
                bar.update(draws * batch.shape[0])
            estimate = log_sum - math.log(num_samples)
            estimates.append(estimate.cpu())
            if return_mc_stderr:
                stderrs.append(_delta_stderr(log_sum, log_sum_sq, num_samples).cpu())
        bar.close()
    out = torch.cat(estimates)
    return (out, torch.cat(stderrs)) if return_mc_stderr else out


def _delta_stderr(log_sum: torch.Tensor, log_sum_sq: torch.Tensor, num_samples: int) -> torch.Tensor:
    """sd(e^l) / (sqrt(S) mean(e^l)) from log sum e^l and log sum e^(2l), computed in log space."""
    if num_samples < 2:
        return torch.full_like(log_sum, math.nan)
    # sample variance / mean^2 = S/(S-1) * (S sum e^2l / (sum e^l)^2 - 1)
    ratio = torch.exp(math.log(num_samples) + log_sum_sq - 2 * log_sum)  # in [1, S]
    rel_var = (ratio - 1).clamp_min(0) * num_samples / (num_samples - 1)
    return torch.sqrt(rel_var / num_samples)


def loglik_summary(estimates: torch.Tensor) -> dict:
    """Mean and standard error over examples of per-example log p(y) estimates.

    Parameters
    ----------
    estimates : Tensor, shape (N,)
        As returned by :func:`loglik`.

    Returns
    -------
    dict
        ``mean`` (nats per example), ``stderr`` (sample standard deviation / sqrt(N); NaN
        for N < 2) and ``num_examples``.  The standard error is over examples, which is
        the spread the literature reports; the Monte Carlo error of each estimate is
        separate (``loglik(..., return_mc_stderr=True)``).
    """
    values = torch.as_tensor(estimates, dtype=torch.float64).reshape(-1)
    n = values.numel()
    mean = values.mean().item() if n else math.nan
    stderr = (values.std(unbiased=True) / math.sqrt(n)).item() if n >= 2 else math.nan
    return {"mean": mean, "stderr": stderr, "num_examples": n}
