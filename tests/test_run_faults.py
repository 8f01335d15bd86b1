"""Faults a cluster job meets, through train() and the CLI: a locked folder, two runs at once,
a full disk (injected and a real tmpfs), SIGTERM, absurd sizes, the default run folder, and
clean exits under torchrun."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pyro_gmvae import checkpoint as ckpt
from pyro_gmvae.config import Config
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.faults import LOCK_NAME
from pyro_gmvae.runfolder import RESUME_KEYS
from pyro_gmvae.training import train

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "experiments" / "run.py"
TINY = ["--no-progress", "--train-subset", "400", "--test-subset", "100"]
SMALL = dict(train_subset=400, test_subset=100, progress=False)


def _env() -> dict:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def _cli(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN), *map(str, args)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(RUN), *map(str, args)],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


# --- one run per folder ----------------------------------------------------------------
HOLD = textwrap.dedent(
    """
    import sys, time
    from pyro_gmvae.runfolder import RunFolder
    folder = RunFolder(sys.argv[1])
    folder.check(resume=False, overwrite=False)
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(tmp_path)
        proc = _cli("--out", out, "--epochs", "1", *TINY, cwd=tmp_path)
        assert proc.returncode == 2
        line = _one_error_line(proc.stderr)
        assert f"in use by another run (pid {holder.pid})" in line
        assert _tree(tmp_path) == before  # nothing changed
    finally:
        holder.kill()
        holder.wait()


def test_two_runs_started_together_on_one_folder_exactly_one_trains(tmp_path):
    out = tmp_path / "run"
    procs = [_start("--out", out, "--epochs", "3", *TINY, cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    done = [(p.returncode, stdout, stderr) for p, (stdout, stderr) in zip(procs, outputs, strict=True)]
    assert sorted(rc for rc, _, _ in done) == [0, 2], done
    _, _, err = next(d for d in done if d[0] == 2)
    line = _one_error_line(err)
    assert "in use by another run (pid" in line or "already holds files" in line, line
    assert _epochs(out) == [1, 2, 3]
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_refused_run_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(UserInputError, match="more clusters than"):
        train(Config(K=1000, out=str(out), epochs=1, **SMALL))
    assert not out.exists()


# --- write errors ------------------------------------------------------------------------
def test_disk_full_at_the_second_checkpoint_keeps_the_first_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_fsync, written = os.fsync, []

    def fsync(fd):  # the disk fills up while epoch 2's checkpoint is written
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            written.append(fd)
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    with pytest.raises(UserInputError) as info:
        train(Config(out=str(out), epochs=3, **SMALL), make_figures=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"cannot write {out / 'checkpoint.pt'}: No space left on device" in message
    assert "KiB free" in message and "KiB needed" in message
    assert "the checkpoint of epoch 1 is intact" in message and "--resume" in message
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the temporary file is gone
    assert not (out / LOCK_NAME).exists()
    assert ckpt.load_checkpoint(out / "checkpoint.pt", required=RESUME_KEYS)["epoch"] == 1

    monkeypatch.setattr(ckpt.os, "fsync", real_fsync)
    result = train(Config(out=str(out), epochs=3, **SMALL), resume=True, make_figures=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert _epochs(out) == [1, 2, 3]


def test_a_failing_figure_write_is_one_line(tmp_path, monkeypatch):
    import pyro_gmvae.plots as plots

    def make_run_figures(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(plots, "make_run_figures", make_run_figures)
    with pytest.raises(UserInputError, match=r"figures: Read-only file system; the checkpoint of epoch 1 is intact"):
        train(Config(out=str(tmp_path / "run"), epochs=1, **SMALL))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip() or proc.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_run_folder_on_a_full_200k_tmpfs_gives_one_line(tiny_tmpfs, tmp_path):
    proc = _cli("--out", tiny_tmpfs / "run", "--epochs", "2", *TINY, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "cannot write" in line and "No space left on device" in line and "KiB free" in line, line
    assert not [p for p in (tiny_tmpfs / "run").iterdir() if p.name.endswith(".tmp") or p.name == LOCK_NAME]


# --- SIGTERM ---------------------------------------------------------------------------
def test_sigterm_gives_one_line_exit_143_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    epochs = 25
    proc = _start("--out", out, "--epochs", epochs, "--no-progress", "--train-subset", "1000", cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    line = _one_error_line(stderr)
    state = ckpt.load_checkpoint(out / "checkpoint.pt", required=RESUME_KEYS)
    assert 1 <= state["epoch"] < epochs
    assert line == (
        f"error: terminated (SIGTERM) after epoch {state['epoch']}; the checkpoint in {out} is kept; "
        f"continue with: python experiments/run.py --out {out} --resume"
    )
    assert not (out / LOCK_NAME).exists()

    resumed = _cli("--out", out, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _epochs(out) == list(range(1, epochs + 1))
    assert json.loads((out / "metrics.json").read_text())["epochs"] == epochs


def test_an_interrupt_that_torchscript_wrapped_is_still_an_interrupt(tmp_path, monkeypatch):
    """SIGTERM raised inside a TorchScript graph reaches train() as a RuntimeError."""
    from pyro_gmvae import faults, training

    real_run_epoch, calls = training.run_epoch, []

    def run_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # what the handler does, then what TorchScript makes of it
            with pytest.raises(faults.Terminated):
                faults._raise_terminated(signal.SIGTERM, None)
            raise RuntimeError("The following operation failed in the TorchScript interpreter.")
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "run_epoch", run_epoch)
    out = tmp_path / "run"
    with pytest.raises(faults.Terminated) as info:
        train(Config(out=str(out), epochs=3, **SMALL), make_figures=False)
    assert info.value.run_folder == out and info.value.last_epoch == 1
    assert isinstance(info.value.__cause__, RuntimeError)
    assert faults.interrupt_behind(RuntimeError()) is None  # remembered once only
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


# --- sizes ---------------------------------------------------------------------------------
def test_k_above_the_training_examples_is_refused_at_once(tmp_path):
    t0 = time.monotonic()
    proc = _cli("--K", "100000", "--no-progress", cwd=tmp_path, timeout=120)
    seconds = time.monotonic() - t0
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "--K 100000 is more clusters than the 5000 training examples" in line
    assert seconds < 60, seconds  # a few seconds: the torch import and the spiral set
    assert not list((tmp_path / "runs").glob("*")), "the refused run left its folder"


# --- the default run folder ----------------------------------------------------------------
def test_runs_without_out_get_fresh_folders_and_resume_continues_the_newest(tmp_path):
    flags = ["--epochs", "1", *TINY]
    first, second = (_cli(*flags, cwd=tmp_path) for _ in range(2))
    for n, proc in enumerate((first, second), 1):
        assert proc.returncode == 0, proc.stderr
        path = f"runs/spiral-v2-K8-seed0-{n}"
        assert proc.stdout.splitlines()[0] == f"run folder: {path}"  # at the start...
        assert f"run folder: {path}" in proc.stdout.splitlines()[1:]  # ...and at the end
        assert _epochs(tmp_path / path) == [1]
    resumed = _cli("--resume", "--epochs", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _epochs(tmp_path / "runs/spiral-v2-K8-seed0-2") == [1, 2]
    assert _epochs(tmp_path / "runs/spiral-v2-K8-seed0-1") == [1]


# --- torchrun --------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_jobs_exit_cleanly(tmp_path):
    """A few of the runs of experiments/torchrun_exits.py (run it for the 30 of the issue)."""
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import torchrun_exits
    finally:
        sys.path.remove(str(REPO / "experiments"))
    summary = torchrun_exits.measure(3, tmp_path, log=lambda line: None)
    assert summary["clean"] == 3, summary["failures"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"spiral-v2-K8-seed0-{n}" for n in (1, 2, 3)]


RECORD_EXIT = textwrap.dedent(
    """
    import os, runpy, sys
    from pathlib import Path
    run, record = sys.argv[1], Path(sys.argv[2])
    sys.argv = [run, *sys.argv[3:]]
    try:
        runpy.run_path(run, run_name="__main__")
    except SystemExit as done:
        (record / f"rank{os.environ['RANK']}").write_text(str(done.code))
        raise
    """
)


def _torchrun_command(tmp_path: Path, out: Path, epochs: int) -> list[str]:
    """Two torchrun ranks of run.py on the CPU, each under ``record.py`` (which writes its exit code)."""
    args = ["--standalone", "--nproc_per_node=2", tmp_path / "record.py", RUN, tmp_path]
    args += ["--out", out, "--epochs", epochs, "--no-progress", "--device", "cpu"]
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


@pytest.mark.slow
def test_sigterm_under_torchrun_every_rank_exits_143_and_rank_0_prints_one_line(tmp_path):
    (tmp_path / "record.py").write_text(RECORD_EXIT)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _torchrun_command(tmp_path, out, epochs=300),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker
    _, stderr = proc.communicate(timeout=120)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["143", "143"]
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith("error: terminated (SIGTERM) after epoch "), stderr
    assert "terminate called" not in stderr
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_locked_folder_refuses_every_torchrun_rank(tmp_path):
    (tmp_path / "record.py").write_text(RECORD_EXIT)
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(out)
        proc = subprocess.run(
            _torchrun_command(tmp_path, out, epochs=1),
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        # The check runs on rank 0 (the writer) and its refusal is raised on every rank.
        assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]
        ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert (
            ours
            == [
                f"error: {out} is in use by another run (pid {holder.pid}); wait for it to finish or pass another --out"
            ]
            * 2
        )
        assert _tree(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_collective_helpers_are_plain_calls_in_one_process():
    from pyro_gmvae import distributed

    info = distributed.DistInfo()
    assert distributed.broadcast("x", info) == "x"
    assert distributed.raise_together(lambda: 3, info) == 3
    with pytest.raises(UserInputError, match="bad"):
        distributed.raise_together(lambda: (_ for _ in ()).throw(UserInputError("bad")), info)
    distributed.shutdown(info)  # nothing to leave
