"""Multi-process training with ``torch.distributed``: one process per GPU (or CPU worker).

Launch with torchrun, which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``::

    torchrun --nproc_per_node=4 experiments/run.py --data mnist --device cuda

Semantics (what :func:`pyro_gmvae.training.train` does with these helpers):

- backend: nccl for CUDA, gloo for CPU; rank r uses ``cuda:LOCAL_RANK``;
- ``--batch-size`` is the *global* batch: every rank takes its slice of width
  ``batch_size // world_size`` out of the same global permutation (same shuffle seed);
- the loss module ``make_elbo(M)(model, guide)`` is wrapped in DistributedDataParallel;
  each rank divides its loss by its own slice size and DDP averages the gradients, so the
  gradient equals the single-process gradient of the global batch mean;
- BatchNorm stays per process (each rank normalises with its own slice's statistics, as
  in plain DDP); rank 0's running statistics are broadcast at every forward;
- parameters start equal on every rank (seeded before building, and DDP broadcasts rank
  0's anyway); after building, rank r draws its Monte Carlo noise from seed ``seed + r``
  (:func:`rank_seed`), so ranks do not reuse each other's draws;
- only rank 0 evaluates and writes the run folder (config, metrics, checkpoints, figures);
  rank 0 alone names a fresh default folder and locks it, and a refusal of its check is
  raised on every rank (:func:`raise_together`);
- every rank ends together: a barrier, then ``destroy_process_group`` on every rank after
  the DDP wrapper is released (:func:`shutdown`); SIGTERM (torchrun forwards it) ends
  every rank with exit 143, and rank 0 prints the one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pyro_gmvae.errors import UserInputError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; ``world_size == 1`` means a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info_from_env(environ=os.environ) -> DistInfo:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as torchrun sets them); absent means 1 process."""
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserInputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserInputError(f"RANK={rank} does not fit WORLD_SIZE={world_size}; launch with torchrun")
    return DistInfo(rank, world_size, local_rank)


def init(device: torch.device) -> DistInfo:
    """Join the process group described by the environment (no-op for a single process).

    Returns the :class:`DistInfo`; for CUDA it also selects ``cuda:LOCAL_RANK``.
    """
    info = info_from_env()
    if not info.enabled:
        return info
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def local_device(info: DistInfo, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` in a multi-process CUDA job."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    """Slice width of each rank; the global batch must split evenly."""
    if batch_size % info.world_size:
        raise UserInputError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the {info.world_size} "
            f"processes; use {batch_size - batch_size % info.world_size or info.world_size}"
        )
    return batch_size // info.world_size


def shard(perm: torch.Tensor, step: int, batch_size: int, info: DistInfo) -> torch.Tensor:
    """Indices of this rank's part of global batch ``step`` of the permutation ``perm``."""
    width = batch_size // info.world_size
    start = step * batch_size + info.rank * width
    return perm[start : start + width]


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed of rank ``rank``'s Monte Carlo draws after the shared-seed build (or a resume at ``epoch``)."""
    return seed + rank + 1_000_003 * epoch


def wrap(loss_fn: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the ELBO module, or ``loss_fn`` itself for one process."""
    if not info.enabled:
        return loss_fn
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(loss_fn, device_ids=device_ids)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``value`` over ranks (the value itself for one process)."""
    if not info.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast(value, info: DistInfo):
    """Rank 0's ``value`` on every rank (any picklable object; ``value`` itself for one process)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_together(check, info: DistInfo):
    """Run ``check()`` on every rank; if it raises :class:`UserInputError` on any rank, raise
    that message on every rank, so no rank waits at a collective for one that left."""
    message, result = None, None
    try:
        result = check()
    except UserInputError as err:
        if not info.enabled:
            raise
        message = str(err)
    if info.enabled:
        messages = [None] * info.world_size
        dist.all_gather_object(messages, message)
        first = next((m for m in messages if m is not None), None)
        if first is not None:
            raise UserInputError(first)
    return result


def shutdown(info: DistInfo, clean: bool = True) -> None:
    """Leave the process group that :func:`init` joined, every rank at the same moment.

    A clean end waits at a barrier for every rank (rank 0 may still be evaluating and
    writing figures) and then destroys the group on every rank.  After an error only the
    destroy runs: the other ranks may never reach a barrier.  Call it after the DDP wrapper
    is released: a process that exits without ``destroy_process_group`` leaves gloo's
    worker threads holding work objects, which aborts the interpreter at finalisation
    (``terminate called without an active exception``, SIGABRT).
    """
    if not (info.enabled and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """Turn ``cpu``, ``cuda`` or ``cuda:N`` into a device, or raise UserInputError."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserInputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserInputError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserInputError(f"device {name!r} requested but only {count} GPU(s) exist (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise UserInputError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device
