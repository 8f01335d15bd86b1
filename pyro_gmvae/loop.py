"""The one optimisation loop: an epoch of minibatch steps, used by every trainer here.

:func:`run_epoch` shuffles with a generator of its own, drops the ragged last batch,
optionally sets the learning rate for the epoch, adds an optional extra loss term, guards
every step against non-finite losses and gradients (naming the step) and advances a
progress bar.  With a fused optimiser (what :func:`adam` makes on a GPU) the guard never
waits for the device: the first bad step is kept in a device tensor, the fused kernel
skips the update on the device from that step on, and the epoch ends by reading the
tensor once.  With torch's default Adam on the CPU (what :func:`adam` makes there) a step
reads its loss only, a scalar; the parameters are read once, at the end of the epoch, and
if anything went wrong the epoch is replayed from a snapshot taken at its start, checking
every step, to name the bad one.  Any other optimiser: every step's loss and gradients are
read before its update.  Training (:func:`pyro_gmvae.training.train`), VAE pretraining,
the fit to a partition and the probes of :mod:`pyro_gmvae.initialization`, and the speed
benchmark all call it, so they shuffle, step and fail the same way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pyro_gmvae.config import ADAM_KERNELS
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


def adam(params, lr: float, kernel: str = "auto") -> torch.optim.Adam:
    """Adam for ``params``.  ``kernel`` "auto": the fused kernel (one pass per step) on a
    GPU, torch's default kernel on the CPU; "fused": the fused kernel on the CPU too.

    On a GPU the fused kernel saves launches and lets :func:`run_epoch` skip a non-finite
    step on the device (``found_inf``) instead of reading a flag back every step.  On the
    CPU the default kernel keeps every CPU result committed under ``experiments/results``
    (and the behaviour pins) reproducible bit for bit: the fused kernel rounds differently
    in float32.  The fused kernel is much faster there too (one vectorised pass over the
    parameters instead of several per tensor: ``experiments/bench_speed.py`` times an MNIST
    epoch with each), hence ``--adam-kernel fused``.
    """
    if kernel not in ADAM_KERNELS:
        raise ValueError(f"adam: kernel must be one of {ADAM_KERNELS}, got {kernel!r}")
    params = list(params)  # tensors, or parameter groups (dicts) as torch.optim takes them
    flat = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    on_gpu = all(p.device.type == "cuda" for p in flat)
    fused = bool(flat) and all(p.is_floating_point() for p in flat) and (kernel == "fused" or on_gpu)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


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
    extra_weight: float | Sequence[float] = 1.0,
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
        are the batch's indices into ``x``.  With a sequence of T weights, T terms (shape
        (T,)) added as ``sum_t extra_weight[t] * term[t]``.
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
        The sum over steps of the loss, shape (); with ``extra_loss``, of (loss, *terms), shape (1 + T,).

    Raises
    ------
    NonFiniteLossError
        A step's loss or gradient is NaN or infinite.  The parameters are left as they
        were before the first bad step, and the error names that step.  A fused optimiser
        (every parameter group ``fused``) skips that step and every later one of the epoch on
        the device (``found_inf``) and the error is raised once the epoch's steps are done.
        torch's default Adam on the CPU: Adam turns a non-finite gradient into non-finite
        parameters, so the epoch runs unchecked but for each step's loss; when a loss, or
        the parameters at the end, are not finite, the parameters, Adam's state and the
        random states are restored to the epoch's start (a snapshot, one copy of each per
        epoch) and the epoch is replayed with the per-step check, which raises at the first
        bad step.  Any other optimiser is checked from the host before each
        ``optimizer.step()``.  BatchNorm's running statistics are not restored: after a bad
        step they may hold what its forward pass left.

    Warns
    -----
    RuntimeWarning
        The replay of a failed epoch found every step finite (a loss that does not repeat
        on the same random state); the replayed epoch is kept.
    """
    if lr is not None:  # a group with an "lr_scale" (--prior-lr) keeps its ratio to lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    weights = tuple(extra_weight) if isinstance(extra_weight, Sequence) else (extra_weight,)
    steps = _Steps(loss_fn, optimizer, params, x, perm, batch_size, extra_loss, weights, batch_indices, epoch, explain)
    guard = guard_kind(optimizer, x.device)
    if guard != "deferred":
        return steps.run(guard, bar)
    saved = _Snapshot(params, optimizer, generator)
    total = steps.run("deferred", bar)
    if total is not None and _host_all_finite([total, *params]):
        return total
    saved.restore()  # the epoch went wrong somewhere: replay it, checking every step, to name the step
    total = steps.run("host", bar, replay=True)
    warnings.warn(
        f"run_epoch: non-finite values at the end of {_where(epoch, None)}, but a replay of the epoch "
        "checking every step found none (a non-deterministic loss?); the replay's result is kept",
        RuntimeWarning,
        stacklevel=2,
    )
    return total


def guard_kind(optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """How :func:`run_epoch` checks the steps of ``optimizer`` on ``device``.

    "device": a fused optimiser (every parameter group ``fused``), a flag on the device.
    "deferred": torch's own Adam on the CPU, each step's loss and the parameters at the end
    of the epoch.  Adam turns a non-finite gradient into a non-finite parameter at that step
    and keeps it so (a NaN or an infinity in its moments makes every later update NaN), so
    finite parameters and a finite loss sum at the end mean every step was finite; the CPU,
    as the replay restores the CPU random generator only; one process, as the ranks of a
    ``torchrun`` see different losses and would leave the epoch at different steps.
    "host": any other optimiser, or torch's Adam under ``torch.distributed``, every step's
    loss and gradients read before its update (a rank's NaN gradients reach every rank
    through DDP's all-reduce, so all ranks raise at the same step).
    """
    if all(group.get("fused") for group in optimizer.param_groups):
        return "device"
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if type(optimizer) is torch.optim.Adam and torch.device(device).type == "cpu" and not distributed:
        return "deferred"
    return "host"


class _Snapshot:
    """The parameters, the optimiser's state and the random states at the start of an epoch.

    What a replay of the epoch needs to run the same steps on the same noise: the CPU's
    global generator (Pyro's draws) and the epoch's ``generator`` after its shuffle (the
    augmentation term and the labelled batches draw from it).  Buffers (BatchNorm's running
    statistics) are not kept: they do not enter a training step's loss, and after a
    non-finite step they are left as after the fused guard's epoch.
    """

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, generator: torch.Generator):
        self.optimizer, self.generator = optimizer, generator
        self.generator_state = generator.get_state()
        self.params = [(p, p.detach().clone()) for p in params]
        self.state = {
            p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
            for p in params
            if p in optimizer.state
        }
        self.rng = torch.get_rng_state()

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in self.params:
            p.copy_(saved)
        self.optimizer.state.clear()
        self.optimizer.state.update(self.state)
        torch.set_rng_state(self.rng)
        self.generator.set_state(self.generator_state)


@dataclass
class _Steps:
    """The steps of one epoch in a fixed order, runnable again (a replay) with another guard."""

    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    x: torch.Tensor
    perm: torch.Tensor
    batch_size: int
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    weights: tuple[float, ...]
    batch_indices: Callable[[torch.Tensor, int, int], torch.Tensor]
    epoch: int | None
    explain: Callable[[torch.Tensor], str] | None

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batch_indices(self.perm, step, self.batch_size)
        return idx, self.x[idx]

    def run(self, guard: str, bar: tqdm | None, replay: bool = False) -> torch.Tensor | None:
        """The epoch's summed losses, checked as ``guard`` says.

        "host": every step's loss and gradients read before its update, the first bad step
        raised; "device": the fused kernel skips every update from the first bad step on and
        the error is raised at the end; "deferred": each step's loss read (a scalar), None
        at the first non-finite loss or the first step whose distributions Pyro refused (the
        caller reads the parameters at the end).  A replay leaves ``bar`` where the first
        run left it.
        """
        optimizer, x, weights = self.optimizer, self.x, self.weights
        total = torch.zeros((1 + len(weights),) if self.extra_loss else (), device=x.device)
        bad_step = torch.full((), -1, device=x.device, dtype=torch.long)
        steps = len(x) // self.batch_size
        try:
            for step in range(steps):
                idx, y = self._batch(step)
                try:
                    loss = self.loss_fn(y)
                    term = None if self.extra_loss is None else self.extra_loss(y, idx)
                except ValueError as err:
                    if not is_invalid_values_error(err):
                        raise
                    if guard == "deferred":
                        return None
                    loss = torch.full((), math.nan, device=x.device)
                    term = None if self.extra_loss is None else loss.expand(len(weights))
                optimizer.zero_grad(set_to_none=True)
                if term is not None:
                    term = term.reshape(len(weights))
                objective = loss if term is None else loss + sum(w * t for w, t in zip(weights, term, strict=True))
                if objective.requires_grad:
                    objective.backward()
                if guard == "deferred":
                    if not math.isfinite(objective.item()):  # a scalar read: the epoch diverged, stop here
                        return None
                else:
                    checked = [objective.detach(), *(p.grad for p in self.params if p.grad is not None)]
                    if guard == "device":  # the fused kernel skips the update while found_inf is 1: no host sync
                        bad_step = torch.where((bad_step < 0) & ~_all_finite(checked), step, bad_step)
                        optimizer.found_inf = (bad_step >= 0).to(torch.float32)
                    elif not _host_all_finite(checked):  # a host read, free on the CPU
                        self._raise(step, bar)
                optimizer.step()
                total += loss.detach() if term is None else torch.cat([loss.detach().reshape(1), term.detach()])
                if bar is not None and not replay:
                    bar.update(1)
        finally:
            if guard == "device":
                optimizer.__dict__.pop("found_inf", None)
        if guard == "device" and steps and int(bad_step) >= 0:  # the epoch's one read of the flag
            self._raise(int(bad_step), bar)
        return total

    def _raise(self, step: int, bar: tqdm | None) -> None:
        if bar is not None:
            bar.close()
        reason = f": {self.explain(self._batch(step)[1])}" if self.explain is not None else ""
        raise NonFiniteLossError(f"non-finite loss or gradient at {_where(self.epoch, step)}{reason}")


def _where(epoch: int | None, step: int | None) -> str:
    parts = ([f"epoch {epoch}"] if epoch is not None else []) + ([f"step {step + 1}"] if step is not None else [])
    return ", ".join(parts) or "the epoch"


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A device bool: every entry of every tensor is finite.

    One read of each tensor, its sum: a NaN or an infinity makes the sum non-finite.  A
    sum can also overflow with every entry finite (entries near the float32 limit,
    3.4e38), which reports the step as non-finite too; a sum of squares (the norm) would
    do that from 1.8e19 on.  The guard of a fused optimiser's steps (a device flag, no host
    read) and the confirmation of :func:`_host_all_finite`.
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    sums = [t.sum() for t in tensors]
    if len({(s.device, s.dtype) for s in sums}) == 1:
        return torch.isfinite(torch.stack(sums)).all()
    return torch.stack([torch.isfinite(s).to(tensors[0].device) for s in sums]).all()


def _host_all_finite(tensors: list[torch.Tensor]) -> bool:
    """Every entry of every tensor is finite: the guard of a step checked from the host.

    The same answer as :func:`_all_finite` in half its time on the CPU: one multi-tensor
    pass (``torch._foreach_norm``) instead of a reduction kernel per tensor.  A sum of
    squares overflows from about 1.8e19 in float32, so a non-finite norm is confirmed by
    :func:`_all_finite` before the step is called non-finite: a step with finite gradients
    that large is not refused.
    """
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack([n.to(tensors[0]) for n in torch._foreach_norm(tensors)])).all()):
        return True
    return bool(_all_finite(tensors))
