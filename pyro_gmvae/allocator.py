"""glibc's allocator, told to keep the memory a training step frees for the next step.

A training step allocates and frees the same large blocks every time: activations, the
(B, K, Dx) table of component densities and its gradients, and the temporaries of torch's
Adam (several copies of each 4 MB weight matrix a step).  By default glibc gives such blocks
back to the operating system when they are freed: a block above its mmap threshold (which
moves between 128 KiB and 32 MiB as blocks are freed) is unmapped, and the top of the heap is
trimmed once more than the trim threshold (twice the mmap threshold) lies free there.  The
next step then takes the memory back a page at a time: thousands of page faults a step, each
zeroing 4 KiB.  How many depends on the heap's history, so two identical steps can differ by
milliseconds.

:func:`keep_freed_memory` fixes the mmap threshold at its largest dynamic value (32 MiB)
and the trim threshold at 256 MiB: the blocks of a step are reused by the next one.  It is
process-wide and stays set (glibc has no way back to the moving threshold), as
``torch.set_num_threads`` does; the cost is up to 256 MiB of freed memory that the process
keeps for itself.  It changes where tensors live, not what is computed: every result is the
same bit for bit (``tests/test_allocator.py``).  :func:`pyro_gmvae.training.train` calls it.
Where the environment sets glibc's own ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` (or malloc tunables in ``GLIBC_TUNABLES``) those win and nothing is
changed; nothing is changed under another C library either.  ``experiments/bench_allocator.py``
times a step with and without it.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 * 2**20  # bytes; glibc's largest dynamic mmap threshold on a 64-bit machine
TRIM_THRESHOLD = 256 * 2**20  # bytes of free memory at the top of the heap kept before trimming
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: dict | None = None


def keep_freed_memory() -> dict | None:
    """Set glibc's mmap and trim thresholds so a step's freed memory serves the next step.

    Returns the settings in force, ``{"mmap_threshold": bytes, "trim_threshold": bytes}``, or
    None where nothing was set: not glibc, or the environment chose its own settings.
    Calling it again changes nothing.
    """
    global _applied
    if _applied is not None:
        return _applied
    if any(name in os.environ for name in _ENVIRONMENT) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return None
    _applied = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    return _applied
