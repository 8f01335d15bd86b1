"""The one optimisation loop: an epoch of minibatch steps, used by every trainer here.

:func:`run_epoch` shuffles with a generator of its own, drops the ragged last batch,
optionally sets the learning rate for the epoch, adds an optional extra loss term, guards
every step against non-finite losses and gradients (naming the step) and advances a
progress bar.  Training (:func:`pyro_gmvae.training.train`), VAE pretraining, the fit to a
partition and the probes of :mod:`pyro_gmvae.initialization`, and the speed benchmark all
call it, so they shuffle, step and fail the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from pyro_gmvae.errors import NonFiniteLossError


def is_invalid_values_error(err: Exception) -> bool:
    """Whether ``err`` is Pyro's validation error for NaN or infinite distribution parameters.

    Validation (on by default) raises it before a non-finite loss could be seen; every
    caller here reports it as a non-finite step instead.
    """
    return isinstance(err, ValueError) and "found invalid values" in str(err)


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar over ``total`` steps that draws nothing when ``enabled`` is False."""
    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", mininterval=0.5)


def _slice(perm: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    return perm[step * batch_size : (step + 1) * batch_size]


def run_epoch(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    *,
    lr: float | None = None,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra_weight: float = 1.0,
    batch_indices: Callable[[torch.Tensor, int, int], torch.Tensor] = _slice,
    bar: tqdm | None = None,
    epoch: int | None = None,
    explain: Callable[[torch.Tensor], str] | None = None,
) -> torch.Tensor:
    """One epoch of optimiser steps over ``x`` in the order ``generator`` shuffles it.

    Parameters
    ----------
    loss_fn : callable
        ``y`` (B, ...) -> the batch's mean loss, a scalar tensor.
    optimizer : torch.optim.Optimizer
        Steps the parameters; its parameters are the ones the guard checks.
    x : Tensor, shape (N, ...)
        The examples, already on the training device.
    batch_size : int
        Examples per step; ``N // batch_size`` steps, the ragged last batch is dropped
        (BatchNorm needs more than one example).
    generator : torch.Generator
        Source of the epoch's permutation (one ``randperm`` per epoch, nothing else).
    lr : float, optional
        Learning rate of every parameter group for this epoch (set before the first step).
    extra_loss : callable, optional
        ``(y, idx)`` -> a scalar term added to the loss as ``extra_weight * term``; ``idx``
        are the batch's indices into ``x``.
    batch_indices : callable
        ``(perm, step, batch_size)`` -> this process's indices of step ``step`` (a rank's
        shard under ``torchrun``); default the plain slice.
    bar : tqdm, optional
        Advanced by one per step; closed before a non-finite step raises.
    epoch : int, optional
        Named in the error of a non-finite step.
    explain : callable, optional
        ``y`` of the failing batch -> what went wrong, appended to that error.

    Returns
    -------
    Tensor
        The sum over steps of the loss, shape (); with ``extra_loss``, of (loss, term), shape (2,).

    Raises
    ------
    NonFiniteLossError
        A step's loss or gradient is NaN or infinite; raised before ``optimizer.step()``, so
        no non-finite value reaches the parameters.
    """
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    params = [p for group in optimizer.param_groups for p in group["params"]]
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    total = torch.zeros((2,) if extra_loss else (), device=x.device)
    bad_step = torch.full((), -1, device=x.device, dtype=torch.long)
    for step in range(len(x) // batch_size):
        idx = batch_indices(perm, step, batch_size)
        y = x[idx]
        try:
            loss = loss_fn(y)
            term = None if extra_loss is None else extra_loss(y, idx)
        except ValueError as err:
            if not is_invalid_values_error(err):
                raise
            loss = term = torch.full((), math.nan, device=x.device)
        optimizer.zero_grad(set_to_none=True)
        objective = loss if term is None else loss + extra_weight * term
        if objective.requires_grad:
            objective.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(objective) & torch.isfinite(grad_norm)
        bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
        # One host sync per step; TraceEnum_ELBO's own NaN warning syncs anyway.
        if int(bad_step) >= 0:
            if bar is not None:
                bar.close()
            where = f"epoch {epoch}, step {step + 1}" if epoch is not None else f"step {step + 1}"
            reason = f": {explain(y)}" if explain is not None else ""
            raise NonFiniteLossError(f"non-finite loss or gradient at {where}{reason}")
        optimizer.step()
        total += loss.detach() if term is None else torch.stack([loss.detach(), term.detach()])
        if bar is not None:
            bar.update(1)
    return total
