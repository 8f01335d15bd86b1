"""TensorBoard event files of a run's per-epoch metrics (``--tensorboard``).

Rank 0 writes ``<run folder>/tensorboard/events.out.tfevents.*`` through
``torch.utils.tensorboard.SummaryWriter``: after each epoch, one scalar per numeric key of
that epoch's ``metrics.jsonl`` row, tagged with the key, at step = the epoch, flushed at
once so the curves move while the run trains (``tensorboard --logdir runs``).  A resumed
run appends to the same folder and hides what a killed run wrote after its last checkpoint
(``purge_step``), as ``metrics.jsonl`` is rewritten from the checkpoint.

The ``tensorboard`` package is an optional extra (``pip install -e ".[tensorboard]"``);
:func:`check_installed` refuses ``--tensorboard`` without it before any work starts.
"""

from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path

from pyro_gmvae.errors import UserInputError

FOLDER = "tensorboard"
INSTALL = 'pip install -e ".[tensorboard]"'


def check_installed(name: str, value) -> None:
    """The ``Config`` check of ``--tensorboard``: with it on, the package must be importable."""
    if value and importlib.util.find_spec("tensorboard") is None:
        raise UserInputError(
            f"--tensorboard needs the tensorboard package, which is not installed; install the extra with {INSTALL} "
            "(or pip install tensorboard), or drop --tensorboard"
        )


def scalars(row: dict) -> dict[str, float]:
    """The scalars of a metrics row: every numeric entry but ``epoch`` (the step)."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


class TensorBoardLog:
    """Writes a run's metric rows as TensorBoard scalars; does nothing when not ``enabled``.

    ``start_epoch`` is the last epoch already done (0 for a new run): events a previous
    process wrote for later epochs are hidden.
    """

    def __init__(self, run_folder: str | Path, start_epoch: int = 0, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_folder) / FOLDER), purge_step=start_epoch + 1)

    def write(self, row: dict) -> None:
        """Add ``row``'s scalars at step ``row["epoch"]`` and flush them to disk."""
        if self.writer is None:
            return
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
