"""Helpers shared by the experiment scripts: the machine a result was measured on, summaries over seeds."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: str | torch.device = "cpu") -> dict:
    """Where a result was measured: CPU, cores, torch threads, platform, versions and device."""
    device = torch.device(device)
    name = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    return {
        "cpu_model": cpu_model(),
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
