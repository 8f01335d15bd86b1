"""A run folder: what a training run writes, and the rules for reusing one.

Layout::

    config.json      the resolved options and the library versions
    metrics.jsonl    one line per finished epoch (rewritten from the checkpoint on resume)
    init.json        what ``--init vae-*`` did before the first epoch
    metrics.json     the final summary
    checkpoint.pt    model, guide, optimiser, RNG state and history (atomic, see checkpoint.py)
    figures/         written by plots.make_run_figures
    .lock            the pid of the run that holds the folder; only while it runs

:class:`RunFolder` owns the folder policy (a new run never silently replaces another; a
resumed one must fit its checkpoint), every file it writes and the RNG state kept in the
checkpoint.  The writer holds an exclusive lock on the folder (:class:`~pyro_gmvae.faults.FolderLock`,
``.lock``) from :meth:`RunFolder.check` to :meth:`RunFolder.close`, so a second run on the
same folder is refused at once.  Every write goes through :meth:`RunFolder.writing`, which
turns an ``OSError`` (a full disk) into one line that names the file, the space and the
last intact checkpoint.

Without ``--out`` a run gets a fresh folder ``runs/<data>-<guide>-K<K>-seed<seed>-<N>``,
N one above the highest taken (:meth:`RunFolder.create_default`); ``--resume`` without
``--out`` continues the highest (:meth:`RunFolder.latest_default`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from pathlib import Path

import numpy as np
import pyro
import torch

from pyro_gmvae import checkpoint as ckpt
from pyro_gmvae.checkpoint import rng_state, set_rng_state  # noqa: F401 (part of the run folder's API)
from pyro_gmvae.config import Config
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.faults import LOCK_NAME, FolderLock, clear_folder, interrupts_deferred, write_error

# Options that fix the architecture: a checkpoint only resumes or loads under the same ones.
ARCHITECTURE_KEYS = ("data", "network", "likelihood", "prior", "guide", "K", "x_dim", "w_dim", "hidden_dim")
# What a checkpoint must hold to resume a run.
RESUME_KEYS = ("config", "data_shape", "model", "guide", "optimizer", "rng", "epoch", "history")
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
INIT_NAME = "init.json"
SUMMARY_NAME = "metrics.json"
DEFAULT_ROOT = Path("runs")
FINAL_KEYS = ("acc_paper", "acc_hungarian", "purity", "nmi", "ari", "elbo", "clusters_used", "epochs", "seconds")


def final_metrics(history: list[dict]) -> dict:
    """The ``metrics.json`` summary from the last epoch's evaluation."""
    last = history[-1]
    final = {key: last.get(key) for key in FINAL_KEYS}
    final.update(elbo=last["test_elbo"], epochs=last["epoch"], seconds=last["elapsed"])
    return final


def versions() -> dict:
    """Versions of the libraries a run was trained with (saved with config and checkpoint)."""
    import pyro_gmvae

    return {
        "pyro_gmvae": pyro_gmvae.__version__,
        "pyro": pyro.__version__,
        "torch": str(torch.__version__),  # TorchVersion is refused by weights_only loading
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def check_compatible(saved: dict, config: Config) -> None:
    """A checkpoint only fits a config with the same architecture; say which option differs."""
    diffs = [
        f"--{k.replace('_', '-')} {getattr(config, k)!r} but the checkpoint has {saved.get(k)!r}"
        for k in ARCHITECTURE_KEYS
        if saved.get(k) != getattr(config, k)
    ]
    if diffs:
        raise UserInputError(
            "cannot resume: " + "; ".join(diffs) + "; drop these flags to resume, or start a new run in another --out"
        )
    if (saved.get("prior_lr") is None) != (config.prior_lr is None):  # the optimiser's groups differ
        raise UserInputError(
            f"cannot resume: --prior-lr {config.prior_lr!r} but the checkpoint has {saved.get('prior_lr')!r}; "
            "--prior-lr gives the prior network an optimiser group of its own, so it can be changed on resume "
            "but not added or dropped; start a new run in another --out"
        )


class RunFolder:
    """The folder of one run.

    Parameters
    ----------
    path : str or Path
    writer : bool
        Whether this process writes (rank 0 under ``torchrun``); the others only read.
    """

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.last_epoch: int | None = None  # of the last checkpoint known to be complete
        self._lock = FolderLock(self.path)
        self._made_root: Path | None = None  # create_default's root, when it made it

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- the default folder -------------------------------------------------------------
    @staticmethod
    def default_name(config: Config) -> str:
        """``<data>-<guide>-K<K>-seed<seed>`` for a resolved config (the prefix of its default folders)."""
        name = Path(config.data).stem if config.data.endswith(".npz") else config.data
        return f"{name}-{config.guide}-K{config.K}-seed{config.seed}"

    @classmethod
    def _numbered(cls, config: Config, root: Path) -> dict[int, Path]:
        pattern = re.compile(re.escape(cls.default_name(config)) + r"-(\d+)")
        if not root.is_dir():
            return {}
        return {int(m.group(1)): p for p in root.iterdir() if (m := pattern.fullmatch(p.name)) and p.is_dir()}

    @classmethod
    def create_default(cls, config: Config, root: str | Path = DEFAULT_ROOT) -> RunFolder:
        """A new folder ``<root>/<default_name>-<N>``, N one above the highest there.

        Made with ``os.mkdir``, which fails if another run took the name first: then the
        next number is tried, so two runs started together never share a folder.
        """
        root = Path(root)
        made_root = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserInputError(f"cannot create {root} ({err.strerror}); pass --out") from None
        number = max(cls._numbered(config, root), default=0) + 1
        while True:
            path = root / f"{cls.default_name(config)}-{number}"
            try:
                os.mkdir(path)
                break
            except FileExistsError:
                number += 1
            except OSError as err:
                raise UserInputError(f"cannot create the run folder {path} ({err.strerror}); pass --out") from None
        folder = cls(path)
        folder._lock.created_folder = True  # close() removes it if the run is refused before writing
        folder._made_root = root if made_root else None  # and runs/ too, if this made it and it is left empty
        return folder

    @classmethod
    def latest_default(cls, config: Config, root: str | Path = DEFAULT_ROOT) -> RunFolder:
        """The highest-numbered default folder of ``config`` (what ``--resume`` without ``--out`` continues)."""
        root = Path(root)
        found = cls._numbered(config, root)
        if not found:
            raise UserInputError(
                f"--resume given but {root} holds no {cls.default_name(config)}-N run; pass the run folder with --out"
            )
        return cls(found[max(found)])

    @property
    def checkpoint_path(self) -> Path:
        return self.path / ckpt.CHECKPOINT_NAME

    # --- policy -------------------------------------------------------------------------
    def _killed_before_first_checkpoint(self) -> bool:
        # Such a run left config.json and an empty metrics.jsonl; resuming starts it at epoch 0.
        metrics = self.path / METRICS_NAME
        return (self.path / CONFIG_NAME).is_file() and (not metrics.exists() or metrics.stat().st_size == 0)

    def check(self, resume: bool, overwrite: bool) -> None:
        """Lock the folder (the writer) and refuse to train into one that holds another run,
        unless told to.  The lock comes first, so the check and the first write are one
        step for any other run; a refused run releases it and leaves nothing behind."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserInputError(f"--out {out} is a file, not a folder; pass a folder for the run")
        if not resume:
            existing = next((p for p in (out, *out.parents) if p.exists()), None)
            if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
                raise UserInputError(
                    f"cannot write the run folder {out}: {existing} is not writable; pass another --out"
                )
        self._check_contents(resume, overwrite)  # refuse without touching the folder...
        try:
            self._take_lock()
            self._check_contents(resume, overwrite)  # ...and again under the lock, for the run that lost a race
        except BaseException:
            self.close()
            raise

    def _take_lock(self) -> None:
        if not self.writer:
            return
        try:
            self._lock.acquire()
        except OSError as err:
            raise UserInputError(
                f"cannot create the run folder {self.path} ({err.strerror}); pass another --out"
            ) from None

    def close(self) -> None:
        """Release the lock; a folder this run created and never wrote to is removed (with the
        default root it made for it, if that is left empty)."""
        self._lock.release(remove_folder_if_empty=True)
        if self._made_root is not None and not self.path.exists():
            with contextlib.suppress(OSError):  # not empty (another run's folder): kept
                self._made_root.rmdir()

    def _check_contents(self, resume: bool, overwrite: bool) -> None:
        out = self.path
        if resume:
            if not self.checkpoint_path.is_file() and not self._killed_before_first_checkpoint():
                raise UserInputError(f"--resume given but {out} holds no checkpoint; drop --resume to start a new run")
            return
        if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
            if not overwrite:
                raise UserInputError(
                    f"{out} already holds files; pass --resume to continue it or --overwrite to replace it"
                )
            if not ((out / CONFIG_NAME).is_file() or self.checkpoint_path.is_file()):
                # --overwrite deletes the folder: only ever one that a run wrote.
                raise UserInputError(
                    f"--overwrite refused: {out} holds files but no run (no config.json); pass another --out"
                )

    def resume_config(self, given: dict) -> Config:
        """The saved options of the run here, overridden by the options ``given`` now.

        The result is checked against the checkpoint (:func:`check_compatible`) when
        training starts.
        """
        config_file = self.path / CONFIG_NAME
        if not config_file.is_file():
            raise UserInputError(f"--resume given but {config_file} does not exist; pass the run folder with --out")
        try:
            saved = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            raise UserInputError(f"{config_file} is not valid JSON; the run folder is damaged") from None
        saved.pop("versions", None)
        try:
            return Config.from_dict({**saved, **given, "out": str(self.path)})
        except (TypeError, ValueError) as err:
            raise UserInputError(f"{config_file} does not hold a pyro_gmvae config ({err})") from None

    def resume_state(self, config: Config) -> dict | None:
        """The checkpoint to resume ``config`` from, checked; None if the run died before its first."""
        if not self.checkpoint_path.is_file():
            return None
        state = ckpt.load_checkpoint(self.checkpoint_path, required=RESUME_KEYS)
        check_compatible(state["config"], config)
        self.last_epoch = state["epoch"]
        if config.epochs < state["epoch"]:
            raise UserInputError(
                f"--epochs is the total: the run in {self.path} already trained {state['epoch']} epochs, "
                f"so --epochs {config.epochs} would train none; pass a larger --epochs"
            )
        return state

    # --- writing ------------------------------------------------------------------------
    def open(self, config: Config, history: list[dict], replace: bool = False) -> None:
        """Make the folder ready: replace a previous run (``replace``), create it, write
        config.json and rewrite metrics.jsonl from ``history`` (the checkpoint's)."""
        if not self.writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserInputError(
                f"cannot create the run folder {self.path} ({err.strerror}); pass another --out"
            ) from None
        if replace:  # under the lock: everything but the lock file goes
            with self.writing(self.path):
                clear_folder(self.path)
        ckpt.remove_stale_temporaries(self.path)  # left by a run killed while writing
        self._write_text(CONFIG_NAME, json.dumps({**config.to_dict(), "versions": versions()}, indent=2))
        # The checkpoint is the record: metrics.jsonl is rewritten from it, so a run killed
        # between the two files never shows an epoch that the checkpoint does not hold.
        self._write_text(METRICS_NAME, "".join(json.dumps(row) + "\n" for row in history))

    def write_init(self, record: dict) -> None:
        self._write_text(INIT_NAME, json.dumps(record, indent=2))

    def write_summary(self, final: dict) -> None:
        self._write_text(SUMMARY_NAME, json.dumps(final, indent=2))

    def write_json(self, name: str, record: dict) -> None:
        """Another JSON record of the run (``labels.json``, the draw of ``--labels``)."""
        self._write_text(name, json.dumps(record, indent=2))

    def append_metrics(self, row: dict) -> None:
        self._append_line(METRICS_NAME, json.dumps(row))

    def save_checkpoint(self, state: dict, shuffle: torch.Generator) -> None:
        """Atomically replace checkpoint.pt with ``state``, the RNG state (:func:`rng_state`,
        with the data-order generator ``shuffle``) and the library versions."""
        if not self.writer:
            return
        # An interrupt waits until the file and last_epoch agree (it would name the older epoch).
        with interrupts_deferred(), self.writing(self.checkpoint_path):  # the old file stays until the rename
            ckpt.save_checkpoint(self.checkpoint_path, {**state, "rng": rng_state(shuffle), "versions": versions()})
            self.last_epoch = state["epoch"]

    @contextlib.contextmanager
    def writing(self, path: Path, needed: int | None = None):
        """Turn an ``OSError`` raised while writing ``path`` into one line
        (:func:`~pyro_gmvae.faults.write_error`) naming the last intact checkpoint."""
        try:
            yield
        except OSError as err:
            needed = getattr(err, "needed", needed)  # set by checkpoint.save_checkpoint
            raise write_error(err, path, needed=needed, last_epoch=self.last_epoch) from None

    def _write_text(self, name: str, text: str) -> None:
        if self.writer:
            payload = text.encode()
            with self.writing(self.path / name, needed=len(payload)):
                ckpt.atomic_write_bytes(self.path / name, payload)

    def _append_line(self, name: str, line: str) -> None:
        if self.writer:
            with self.writing(self.path / name, needed=len(line) + 1), open(self.path / name, "a") as f:
                f.write(line + "\n")
                f.flush()
