"""Faults a run meets on a shared machine: two runs on one folder, a full disk, SIGTERM,
sizes that cannot fit.

- :class:`FolderLock`: an exclusive ``fcntl.flock`` on ``<run folder>/.lock``, taken before
  the first write and held for the run.  The kernel drops a flock when its process dies, so
  a lock file left by a killed run is stale by construction and simply taken over.
- :func:`write_error`: turns an ``OSError`` raised while writing the run folder into one
  :class:`~pyro_gmvae.errors.UserInputError` line (what, where, how much space).
- :class:`Terminated` and :func:`raise_on_sigterm`: SIGTERM (what a scheduler sends before
  it kills a job) becomes an exception that unwinds like Ctrl-C.
- :func:`check_sizes`: refuses, before any data reach the device, a K above the number of
  training examples and a run whose estimated memory exceeds what the device has free.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from pyro_gmvae.errors import UserInputError

try:  # POSIX; on Windows runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> str:
    """The pid in a held lock file (its holder writes it just after taking the lock)."""
    for _ in range(50):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.01)
    return "unknown"


class FolderLock:
    """Exclusive lock on a run folder for the life of a run.

    ``acquire()`` creates the folder if needed, opens ``.lock`` in it and takes a
    non-blocking ``flock``; a second process gets a :class:`UserInputError` naming the
    holder's pid.  The lock file holds the holder's pid and is deleted on release; the
    lock itself lives in the kernel, so a run killed with SIGKILL leaves a stale file that
    the next run takes over (and says so in the log).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self.created_folder = False

    def acquire(self) -> FolderLock:
        if fcntl is None:  # pragma: no cover
            return self
        if self._fd is not None:
            return self
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
                self.created_folder = True
            except FileExistsError:
                pass
        while True:
            fd = self._open_and_lock()
            # release() unlinks the file under the lock: a process that opened it just before
            # then holds a lock on a file no longer in the folder, and must try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not _pid_alive(int(previous)):
            logger.info("took over the stale lock of %s left by pid %s", self.folder, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _open_and_lock(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise UserInputError(
                f"{self.folder} is in use by another run (pid {holder}); wait for it to finish or pass another --out"
            ) from None
        return fd

    def release(self, remove_folder_if_empty: bool = False) -> None:
        """Drop the lock and delete its file; with ``remove_folder_if_empty``, also undo a
        folder that :meth:`acquire` made and nothing else wrote to."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # under the lock: see acquire()
        with contextlib.suppress(OSError):
            if remove_folder_if_empty and self.created_folder:
                self.folder.rmdir()  # fails, and is kept, when it holds anything
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clear_folder(folder: Path) -> None:
    """Delete everything in ``folder`` but its lock file (``--overwrite`` under the lock)."""
    for entry in Path(folder).iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_error(err: OSError, path: Path, needed: int | None = None, last_epoch: int | None = None) -> UserInputError:
    """One line for an ``OSError`` raised while writing ``path`` of the run folder."""
    what = err.strerror or type(err).__name__
    detail = []
    if err.errno == errno.ENOSPC:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(Path(path).parent).free
            detail.append(f"{free / 1024:.0f} KiB free")
        if needed:
            detail.append(f"about {needed / 1024:.0f} KiB needed")
    keep = ""
    if last_epoch:
        fix = "free space" if err.errno == errno.ENOSPC else "fix this"
        keep = f"; the checkpoint of epoch {last_epoch} is intact, {fix} and continue with --resume"
    extra = f" ({', '.join(detail)})" if detail else ""
    return UserInputError(f"cannot write {path}: {what}{extra}{keep}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread; a KeyboardInterrupt so it unwinds like Ctrl-C."""

    exit_code = 128 + signal.SIGTERM


_received: int | None = None  # the last SIGTERM or SIGINT the handlers below raised for


def _raise_terminated(signum, frame):
    global _received
    _received = signum
    raise Terminated()


def _raise_interrupt(signum, frame):
    global _received
    _received = signum
    raise KeyboardInterrupt()


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def raise_on_sigterm():
    """In the block, SIGTERM raises :class:`Terminated`, and SIGINT ``KeyboardInterrupt`` as
    before; both are remembered for :func:`interrupt_behind` (enter in a script's main thread).

    The handlers found on entry come back on exit, and any signal still remembered is
    forgotten, so a ``main()`` called in-process leaves its caller as it found it.
    """
    global _received
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        _restore(previous)
        _received = None


def _restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT and SIGTERM until the block is done, then act on the first one that came.

    For a step that must finish once begun: a checkpoint renamed into place and the record
    of its epoch, so that an interrupt never reports an older epoch than the file on disk.
    Only the main thread can change handlers; elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in previous:
        signal.signal(signum, lambda number, frame: came.append(number))
    try:
        yield
    finally:
        _restore(previous)
        if came:
            handler = previous[came[0]]
            if callable(handler):
                handler(came[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(came[0])


def interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that ended a run with ``err``, or None.

    An interrupt raised while TorchScript (Pyro's compiled einsum) or another C++ caller
    runs Python code comes back wrapped in a ``RuntimeError``; the handlers of
    :func:`raise_on_sigterm` remember the signal, so it is recovered here (once).
    """
    global _received
    if isinstance(err, KeyboardInterrupt):
        _received = None
        return err
    signum, _received = _received, None
    if signum == signal.SIGTERM:
        return Terminated()
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return None


# --- sizes --------------------------------------------------------------------------
def _count_parameters(config, data_shape: tuple[int, ...]) -> int:
    from pyro_gmvae.build import build_model_and_guide

    with torch.device("meta"):  # shapes only: nothing is allocated
        model, guide = build_model_and_guide(config, data_shape)
    seen = {}
    for module in (model, guide):
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def estimate_memory(config, data_shape: tuple[int, ...], num_train: int, num_test: int = 0) -> dict:
    """Rough bytes a run needs on its device: parameters with their gradient and two Adam
    moments, the data, and the activations of one step.

    The activations are dominated by the (M, B, K, Dx) tables of the K components (locations,
    scales, log-densities and their gradients) and by the decoder's output; a factor of 8
    float32 copies covers the forward and the backward pass.  Returns the parts and ``total``.
    """
    params = _count_parameters(config, data_shape)
    example = math.prod(data_shape)
    batch = config.batch_size * config.mc_samples
    activations = 8 * batch * (config.K * config.x_dim + 2 * example + 4 * config.hidden_dim)
    parts = {
        "parameters": 4 * 4 * params,
        "data": 4 * example * (num_train + num_test),
        "activations": 4 * activations,
    }
    parts["total"] = sum(parts.values())
    parts["num_parameters"] = params
    return parts


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (MemAvailable for the CPU), or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_sizes(config, data_shape: tuple[int, ...], num_train: int, num_test: int, device: torch.device) -> dict:
    """Refuse sizes that cannot work, before any data reach the device; return the estimate."""
    if config.K > num_train:
        raise UserInputError(
            f"--K {config.K} is more clusters than the {num_train} training examples; pass --K {num_train} or fewer"
        )
    estimate = estimate_memory(config, data_shape, num_train, num_test)
    limit = available_memory(device)
    if limit is not None and estimate["total"] > limit:
        gib = 1024**3
        raise UserInputError(
            f"this run needs about {estimate['total'] / gib:.1f} GiB on {device} "
            f"({estimate['num_parameters']:,} parameters; {estimate['activations'] / gib:.1f} GiB of activations per "
            f"step) but {limit / gib:.1f} GiB are free; lower --K, --x-dim, --hidden-dim or --batch-size"
        )
    return estimate
