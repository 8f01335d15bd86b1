"""The spiral default is pinned: the same seed gives the same per-epoch metrics.jsonl as the
recorded run (commit 4db3f53, whose library is that of da1ff50), in every key but timings.

Refactors must keep the random numbers drawn, their order and the arithmetic the same; this
test fails on any change that alters what the default run computes.  Results depend on the
number of CPU threads, so the subprocess runs with one (the recording's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "spiral_seed0_metrics.jsonl"
THREADS = "1"  # torch's intra-op thread count of the recording
TIMING_KEYS = {"seconds", "elapsed"}


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_spiral_default_matches_the_recorded_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "OMP_WAIT_POLICY": "PASSIVE"}
    out = tmp_path / "run"
    cmd = [sys.executable, "experiments/run.py", "--out", str(out), "--no-progress", "--seed", "0"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    expected, got = _rows(FIXTURE), _rows(out / "metrics.jsonl")
    assert len(got) == len(expected)
    for want, row in zip(expected, got, strict=True):
        assert row.keys() == want.keys(), row["epoch"]
        assert row == pytest.approx(want, rel=1e-6, abs=1e-9), f"epoch {row['epoch']} differs"
