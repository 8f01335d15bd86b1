"""Atomic, verified checkpoints.

A checkpoint is written to a temporary file in the same folder, flushed to disk and then
renamed over the old one, so a run killed at any moment leaves either the previous
complete checkpoint or the new complete one, never a torn file.  Loading checks the
format marker and version and says clearly what is wrong with a truncated or foreign file.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from pyro_gmvae.errors import UserInputError

FORMAT = "pyro_gmvae-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a flushed temporary file and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    with _suppress():  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that a process killed inside ``atomic_write_bytes`` left.

    Only call this while no other process writes into ``folder``.  Returns what was removed.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        with _suppress():
            tmp.unlink()
            removed.append(tmp)
    return removed


def encode_checkpoint(state: dict) -> bytes:
    """The bytes of a checkpoint of ``state``, with the format marker and version."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, state: dict) -> None:
    """Save ``state`` (plain tensors, numbers, dicts) atomically with a format marker.

    An ``OSError`` leaves the previous checkpoint in place and carries the checkpoint's
    size as ``needed`` (bytes).
    """
    payload = encode_checkpoint(state)
    try:
        atomic_write_bytes(Path(path), payload)
    except OSError as err:
        err.needed = len(payload)
        raise


def load_checkpoint(path: Path, map_location="cpu", required: tuple[str, ...] = ()) -> dict:
    """Load and verify a checkpoint; raise UserInputError naming the file and the problem.

    ``required`` lists entries the caller needs; a checkpoint without them is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no checkpoint at {path}; train a run there first (experiments/run.py --out ...)")
    # torch warns about what it finds in a file's bytes (random bytes can read as "pickle protocol
    # 237"): an unreadable file gets the one line below only; a readable one's warnings are shown
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:
            raise UserInputError(
                f"checkpoint {path} is unreadable ({type(err).__name__}); "
                "it is truncated or not a pyro_gmvae checkpoint"
            ) from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserInputError(f"{path} is not a pyro_gmvae checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise UserInputError(
            f"checkpoint {path} has format version {state.get('version')}, this pyro_gmvae reads version {VERSION}"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise UserInputError(f"checkpoint {path} lacks {', '.join(missing)}; it is damaged, retrain the run")
    return state


def rng_state(shuffle: torch.Generator) -> dict:
    """Every random number generator a run draws from, as checkpoint-safe values."""
    # numpy's state holds an ndarray, which weights_only loading refuses: store a tensor.
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "shuffle": shuffle.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, shuffle: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
