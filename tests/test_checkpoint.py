"""Atomic, verified checkpoints: damaged or foreign files fail with one clear line."""

from __future__ import annotations

import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_errors_cli import run_cli, snapshot

from pyro_gmvae import checkpoint as ckpt
from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.data import load_spiral
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.posterior import cluster_probs
from pyro_gmvae.training import RESUME_KEYS, train

SMALL = dict(epochs=2, train_subset=400, test_subset=200, progress=False)


def rebuild(state: dict):
    """Model and guide from a checkpoint alone, in eval-ready form."""
    config = Config.from_dict(state["config"])
    model, guide = build_model_and_guide(config, tuple(state["data_shape"]))
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    return model, guide


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A two-epoch spiral run folder, trained once for the whole module."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    result = train(Config(out=str(out), **SMALL), make_figures=False)
    return out, result


def test_checkpoint_rebuilds_the_same_cluster_probabilities(trained_run):
    out, result = trained_run
    state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME, required=RESUME_KEYS)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    model, guide = rebuild(state)
    x_test = load_spiral().x_test[:200]
    assert torch.equal(cluster_probs(model, guide, x_test), cluster_probs(result.model, result.guide, x_test))


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_refused(trained_run, tmp_path, fraction):
    payload = (trained_run[0] / ckpt.CHECKPOINT_NAME).read_bytes()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(payload[: int(fraction * len(payload))])
    with pytest.raises(UserInputError, match="truncated or not a pyro_gmvae checkpoint") as info:
        ckpt.load_checkpoint(path)
    assert str(path) in str(info.value)


def test_foreign_and_random_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    with pytest.raises(UserInputError, match="not a pyro_gmvae checkpoint"):
        ckpt.load_checkpoint(foreign)
    torch.save(torch.zeros(3), foreign)  # not even a dict
    with pytest.raises(UserInputError, match="not a pyro_gmvae checkpoint"):
        ckpt.load_checkpoint(foreign)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(UserInputError, match="unreadable"):
        ckpt.load_checkpoint(noise)
    with pytest.raises(UserInputError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "absent.pt")


def test_version_and_required_entries_are_checked(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(path, {"epoch": 1})
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    with pytest.raises(UserInputError, match="lacks config"):
        ckpt.load_checkpoint(path, required=("config", "epoch"))
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION + 1}, path)
    with pytest.raises(UserInputError, match="format version"):
        ckpt.load_checkpoint(path)


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """A write that dies after the temporary file was filled leaves the old file whole."""
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"epoch": 1, "w": torch.arange(5.0)})
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # the temporary is gone
    assert ckpt.load_checkpoint(path)["epoch"] == 1


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "keep.txt").write_text("x")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".checkpoint.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# --- through the CLI --------------------------------------------------------------------
def _truncate(run: Path) -> None:
    path = run / ckpt.CHECKPOINT_NAME
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])


def _foreign(run: Path) -> None:
    torch.save({"a": 1}, run / ckpt.CHECKPOINT_NAME)


def _random(run: Path) -> None:
    (run / ckpt.CHECKPOINT_NAME).write_bytes(os.urandom(50_000))


def _missing(run: Path) -> None:
    (run / ckpt.CHECKPOINT_NAME).unlink()


# id, damage to the run folder, extra flags, words the message must contain
RESUME_CASES = [
    ("truncated", _truncate, [], ["checkpoint", "unreadable", "truncated"]),
    ("foreign", _foreign, [], ["not a pyro_gmvae checkpoint"]),
    ("random-bytes", _random, [], ["unreadable"]),
    ("missing", _missing, [], ["holds no checkpoint", "drop --resume"]),
    ("other-K", None, ["--K", "5"], ["--K 5", "checkpoint has 8", "drop these flags"]),
    ("other-guide", None, ["--guide", "v1"], ["--guide 'v1'", "'v2'"]),
]


@pytest.fixture(scope="module")
def resume_results(trained_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume_errors")

    def one(case):
        case_id, damage, flags, _ = case
        run = base / case_id
        shutil.copytree(trained_run[0], run)
        if damage:
            damage(run)
        before = snapshot(base / case_id)
        proc = run_cli(["--out", str(run), "--resume", "--epochs", "3", "--no-progress", *flags], cwd=run)
        return proc, before, snapshot(run)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c[0] for c in RESUME_CASES], pool.map(one, RESUME_CASES), strict=True))


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_from_a_bad_checkpoint_gives_one_line(case, resume_results):
    proc, before, after = resume_results[case[0]]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in case[3]:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert after == before, "the run folder was changed"


def test_bytes_that_torch_warns_about_are_refused_without_its_warning(tmp_path):
    """Random bytes that open like a pickle of protocol 237 made torch warn before our one line."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"\x80\xed" + bytes(range(256)) * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserInputError, match="unreadable"):
            ckpt.load_checkpoint(path)
    assert [str(w.message) for w in caught] == []
