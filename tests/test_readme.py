"""The README is true: its Python examples execute and its commands run as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# Commands that are not run here, each with the reason.  Everything else in a ```bash
# block of the README is executed.
SKIP = {
    "python -m pytest": "is this test suite itself",
    "pip install": "CI installs the project exactly this way before running the suite",
    "--device cuda": "needs a GPU" if not torch.cuda.is_available() else None,
    "torchrun": "multi-process launch, covered by tests/test_distributed.py",
    "--download": "needs the internet",
    "experiments/reproduce.py": "hours of training; its smoke grid runs in tests/test_reproduce.py",
    "experiments/bench_speed.py": "a benchmark, minutes long; its quick mode runs in tests/test_bench_speed.py",
    "experiments/spiral_seeds.py": "three full training runs; the same code path is tested in tests/test_training.py",
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                commands.append(part.strip())
    return commands


def _skip_reason(command: str) -> str | None:
    for pattern, reason in SKIP.items():
        if pattern in command and reason:
            return reason
    return None


def test_quickstart_is_two_commands():
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quickstart, flags=re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines == ['pip install -e ".[dev]" && python experiments/run.py', "python -m pytest -q"]


RUNNABLE = [c for c in _commands() if _skip_reason(c) is None]


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, tmp_path):
    # Run from a scratch folder that sees the repository's experiments/, so run folders
    # land in tmp_path and the work tree stays clean.
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_executes(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_blocks("python")[index], f"README python block {index}", "exec"), {"__name__": "readme"})
