"""Helpers shared by the experiment scripts: the machine a result was measured on, summaries over seeds."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from pathlib import Path

import torch


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``<path>.lock`` (a blocking ``flock``; POSIX only, else no
    lock): the read-merge-write of a results file by several benchmark processes at once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, colon, value = line.partition(":")
            if colon:
                fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model(info: dict | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (or ``info``, its fields), else what ``platform`` knows."""
    name = (_cpuinfo() if info is None else info).get("model name")
    return name or platform.processor() or platform.machine()


def cpu_signature() -> dict:
    """What decides how a CPU rounds float32 training: the model name, the family and model
    numbers of /proc/cpuinfo (two AMD EPYC generations share the name) and torch's vector
    kernels (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, ...)."""
    info = _cpuinfo()
    return {
        "cpu_model": cpu_model(info),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def machine(device: str | torch.device = "cpu") -> dict:
    """Where a result was measured: CPU, cores, torch threads, platform, versions and device."""
    device = torch.device(device)
    name = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    return {
        **cpu_signature(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": name,
    }


def summary(values: list[float], low: str = "min", high: str = "max") -> dict:
    """Mean, standard deviation (0 for one value), smallest and largest, named ``low`` and ``high``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        high: max(values),
        low: min(values),
    }


def git_commit(repo: Path | None = None) -> dict:
    """The commit a result was made at: ``sha`` (None outside a git checkout) and whether the
    work tree held uncommitted changes to tracked files (``dirty``) outside
    ``experiments/results/``: the committed results are what the scripts write, so a result
    file updated by an earlier cell of the same run does not count."""
    import subprocess

    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {
            "sha": git("rev-parse", "HEAD"),
            "dirty": bool(
                git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)experiments/results")
            ),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}


# Options that say where and how a run was executed, not what was trained: left out when a
# result's config is compared with today's defaults.
RUN_KEYS = ("out", "seed", "device", "progress", "tensorboard", "data_root", "download", "train_subset", "test_subset")


def trained_config(config: dict) -> dict:
    """A resolved config without :data:`RUN_KEYS`: what decides the numbers a run gives."""
    return {k: v for k, v in config.items() if k not in RUN_KEYS and k != "versions"}
