"""Faults of pyro_gmvae.faults: the folder lock, write errors, SIGTERM, size checks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pyro_gmvae.config import Config
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.faults import (
    LOCK_NAME,
    FolderLock,
    Terminated,
    check_sizes,
    clear_folder,
    estimate_memory,
    write_error,
)

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pyro_gmvae.faults import FolderLock
    lock = FolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserInputError, match=rf"in use by another run \(pid {holder.pid}\)"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock file is stale and is taken over.
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)
    lock = FolderLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    lock.release()


def test_lock_in_one_process_excludes_a_second_descriptor(tmp_path):
    with FolderLock(tmp_path / "run") as lock:
        assert lock.held and lock.created_folder
        with pytest.raises(UserInputError, match="in use by another run"):
            FolderLock(tmp_path / "run").acquire()
    FolderLock(tmp_path / "run").acquire().release()


def test_release_undoes_a_folder_the_lock_made(tmp_path):
    lock = FolderLock(tmp_path / "new").acquire()
    lock.release(remove_folder_if_empty=True)
    assert not (tmp_path / "new").exists()


def test_clear_folder_keeps_only_the_lock(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("x")
    (tmp_path / "config.json").write_text("{}")
    with FolderLock(tmp_path):
        clear_folder(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_write_error_is_one_line_with_space_and_resume_hint(tmp_path):
    err = OSError(errno.ENOSPC, "No space left on device")
    message = str(write_error(err, tmp_path / "checkpoint.pt", needed=300 * 1024, last_epoch=3))
    assert "\n" not in message
    assert "No space left on device" in message and "about 300 KiB needed" in message
    assert "epoch 3 is intact" in message and "--resume" in message


def test_terminated_unwinds_like_ctrl_c():
    assert issubclass(Terminated, KeyboardInterrupt)
    assert Terminated.exit_code == 143


def test_k_above_the_training_examples_is_refused():
    config = Config(K=100000).resolved()
    with pytest.raises(UserInputError, match="--K 100000 is more clusters than the 5000 training examples"):
        check_sizes(config, (2,), 5000, 0, torch.device("cpu"))


def test_a_run_that_cannot_fit_is_refused_with_the_estimate():
    config = Config(K=4000, x_dim=20000, hidden_dim=20000).resolved()
    with pytest.raises(UserInputError, match=r"needs about [\d.]+ GiB on cpu .* GiB are free"):
        check_sizes(config, (2,), 5000, 0, torch.device("cpu"))


def test_memory_estimate_counts_the_parameters_exactly():
    from pyro_gmvae.build import build_model_and_guide

    config = Config().resolved()
    model, guide = build_model_and_guide(config, (2,))
    count = len({id(p): p for m in (model, guide) for p in m.parameters()})
    params = {id(p): p.numel() for m in (model, guide) for p in m.parameters()}
    assert count and estimate_memory(config, (2,), 100)["num_parameters"] == sum(params.values())


def test_an_interrupt_during_a_deferred_block_comes_after_it():
    """A checkpoint's rename and the record of its epoch finish together; the Ctrl-C comes after."""
    import signal

    from pyro_gmvae.faults import interrupts_deferred

    signal.signal(signal.SIGINT, signal.default_int_handler)  # the test does not depend on what ran before it
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
