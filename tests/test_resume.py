"""Resuming a run: N epochs in one go and N/2 + resume + N/2 give bit-identical results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

from pyro_gmvae import Config, train
from pyro_gmvae.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pyro_gmvae.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(data="spiral", train_subset=600, test_subset=200, seed=3, progress=False)
TIMING = ("seconds", "elapsed")


def _untimed(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMING}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_tensors(a, b, where: str) -> None:
    """Every tensor in two nested state dicts is bit-identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")


def _assert_same_checkpoints(one_go: Path, resumed: Path) -> None:
    a = load_checkpoint(one_go / CHECKPOINT_NAME)
    b = load_checkpoint(resumed / CHECKPOINT_NAME)
    for part in ("model", "guide", "optimizer", "rng"):
        _assert_same_tensors(a[part], b[part], part)
    assert a["epoch"] == b["epoch"] == 4


@pytest.mark.parametrize("guide", ["v2", "v1"])
def test_resume_is_bit_identical_to_one_run(tmp_path, guide):
    one_go = train(Config(epochs=4, out=str(tmp_path / "one"), guide=guide, **SMALL), make_figures=False)

    half = tmp_path / "half"
    first = train(Config(epochs=2, out=str(half), guide=guide, **SMALL), make_figures=True)
    lines_before = (half / "metrics.jsonl").read_text().splitlines()
    assert len(lines_before) == 2 and len(first.history) == 2
    resumed = train(Config(epochs=4, out=str(half), guide=guide, **SMALL), resume=True, make_figures=False)

    for name in ("model", "guide"):
        a, b = getattr(one_go, name).state_dict(), getattr(resumed, name).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after resume"
    _assert_same_checkpoints(tmp_path / "one", half)

    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert [_untimed(r) for r in resumed.history] == [_untimed(r) for r in one_go.history]
    # The metrics file is appended to: the two old lines are kept byte for byte.
    lines_after = (half / "metrics.jsonl").read_text().splitlines()
    assert len(lines_after) == 4
    assert lines_after[:2] == lines_before
    assert [_untimed(r) for r in _jsonl(half / "metrics.jsonl")] == [_untimed(r) for r in one_go.history]
    assert _untimed(resumed.final) == _untimed(one_go.final)
    # Timing carries on: the elapsed clock continues from the checkpoint's.
    assert resumed.history[2]["elapsed"] >= resumed.history[1]["elapsed"] == first.history[1]["elapsed"]


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    train(Config(epochs=2, out=str(tmp_path), **SMALL), make_figures=False)
    with pytest.raises(UserInputError, match="--epochs is the total"):
        train(Config(epochs=1, out=str(tmp_path), **SMALL), resume=True, make_figures=False)


def test_resume_with_prior_lr_is_bit_identical_and_cannot_add_it(tmp_path):
    """--prior-lr's second parameter group resumes bit for bit; adding it on resume is refused."""
    flags = dict(prior_lr=1e-3, **SMALL)
    train(Config(epochs=4, out=str(tmp_path / "one"), **flags), make_figures=False)
    train(Config(epochs=2, out=str(tmp_path / "two"), **flags), make_figures=False)
    train(Config(epochs=4, out=str(tmp_path / "two"), **flags), resume=True, make_figures=False)
    _assert_same_checkpoints(tmp_path / "one", tmp_path / "two")

    train(Config(epochs=1, out=str(tmp_path / "plain"), **SMALL), make_figures=False)
    with pytest.raises(UserInputError, match="cannot resume: --prior-lr 0.001 but the checkpoint has None"):
        train(Config(epochs=2, out=str(tmp_path / "plain"), **flags), resume=True, make_figures=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / "run.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_resume_trains_the_remaining_epochs(tmp_path):
    out = tmp_path / "run"
    small = ["--train-subset", "600", "--test-subset", "200", "--seed", "3", "--no-progress"]
    first = _cli("--out", str(out), "--epochs", "2", *small)
    assert first.returncode == 0, first.stderr[-2000:]
    assert [row["epoch"] for row in _jsonl(out / "metrics.jsonl")] == [1, 2]
    before = (out / "metrics.jsonl").read_text().splitlines()

    # Only --out, --resume and --epochs: every other option comes from the saved config.
    second = _cli("--out", str(out), "--resume", "--epochs", "4")
    assert second.returncode == 0, second.stderr[-2000:]
    rows = _jsonl(out / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == before
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 4

    # Same parameters as the library trained the same options in one go.
    one_go = tmp_path / "one"
    train(Config(epochs=4, out=str(one_go), **SMALL), make_figures=False)
    _assert_same_checkpoints(one_go, out)
    assert [_untimed(r) for r in rows] == [_untimed(r) for r in _jsonl(one_go / "metrics.jsonl")]


def test_cli_refuses_fewer_epochs_than_done(tmp_path, capsys):
    cli = load_script("run")
    small = ["--train-subset", "600", "--test-subset", "200", "--no-progress"]
    assert cli.main(["--out", str(tmp_path), "--epochs", "2", *small]) == 0
    assert cli.main(["--out", str(tmp_path), "--resume", "--epochs", "1"]) == 2
    assert "--epochs is the total" in capsys.readouterr().err
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_with_the_fused_adam_kernel_is_bit_identical(tmp_path):
    """--adam-kernel fused: the checkpoint holds the fused optimiser and resumes it bit for bit."""
    small = dict(SMALL, adam_kernel="fused")
    train(Config(epochs=4, out=str(tmp_path / "one"), **small), make_figures=False)
    train(Config(epochs=2, out=str(tmp_path / "half"), **small), make_figures=False)
    train(Config(epochs=4, out=str(tmp_path / "half"), **small), resume=True, make_figures=False)
    _assert_same_checkpoints(tmp_path / "one", tmp_path / "half")
    groups = load_checkpoint(tmp_path / "half" / CHECKPOINT_NAME)["optimizer"]["param_groups"]
    assert groups and all(group["fused"] for group in groups)
