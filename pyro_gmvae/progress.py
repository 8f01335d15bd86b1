"""What a run shows while it works: tqdm bars, and status lines for the phases that run as one call.

The optimisation loops advance a bar per step (:func:`pyro_gmvae.loop.progress_bar`).  A
phase that is a single long call (a UMAP embedding, k-means, an evaluation of the test
split) cannot advance a bar, so it shows a :func:`status` line instead: what it is doing
and the time since it started, redrawn every second until it ends.  Both draw nothing when
disabled (``--no-progress``, and every rank but 0 under torchrun), and neither touches a
random number generator.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tqdm.auto import tqdm

__all__ = ["status"]


@contextlib.contextmanager
def status(desc: str, enabled: bool, refresh: float = 1.0) -> Iterator[tqdm]:
    """A status line ``desc [elapsed]`` for the duration of the block.

    The line is drawn at once and redrawn every ``refresh`` seconds from a helper thread, so
    the elapsed time moves while the block runs a long call; it stays on screen when the
    block ends, with the phase's total time.  Yields the tqdm object (``set_description_str``
    changes the text); with ``enabled`` False nothing is drawn and no thread starts.
    """
    line = tqdm(total=None, desc=desc, disable=not enabled, bar_format="{desc} [{elapsed}]")
    if line.disable:
        yield line
        return
    done = threading.Event()

    def redraw():
        while not done.wait(refresh):
            line.refresh()

    thread = threading.Thread(target=redraw, name="pyro_gmvae-status", daemon=True)
    thread.start()
    try:
        yield line
    finally:
        done.set()
        thread.join()
        line.close()
