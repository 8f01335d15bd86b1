"""``--tensorboard``: event files with the same per-epoch scalars as metrics.jsonl, and one
clear line before any work when the optional ``tensorboard`` package is missing."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import load_script

from pyro_gmvae import Config, tensorboard_log, train

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(
    not HAVE_TENSORBOARD, reason='the optional tensorboard package is not installed (pip install -e ".[tensorboard]")'
)


def _events(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _config(out, epochs: int) -> Config:
    return Config(epochs=epochs, train_subset=400, test_subset=100, out=str(out), progress=False, tensorboard=True)


def _same_as_metrics(folder) -> None:
    rows, events = _rows(folder), _events(folder)
    assert set(events) == set(tensorboard_log.scalars(rows[0]))
    assert {"train_loss", "test_elbo", "acc_hungarian", "nmi", "lr", "seconds"} <= set(events)
    for tag, points in events.items():
        expected = [(row["epoch"], tensorboard_log.scalars(row)[tag]) for row in rows]
        assert [step for step, _ in points] == [step for step, _ in expected], tag
        assert [value for _, value in points] == pytest.approx([v for _, v in expected], rel=1e-6, nan_ok=True), tag


@needs_tensorboard
def test_two_epochs_write_every_metric_of_every_epoch(tmp_path):
    run = train(_config(tmp_path / "run", 2), make_figures=False)
    assert len(run.history) == 2
    _same_as_metrics(tmp_path / "run")


@needs_tensorboard
def test_resume_continues_the_curves_and_hides_what_a_killed_run_wrote(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    train(_config(out, 2), make_figures=False)
    stray = SummaryWriter(str(out / "tensorboard"))  # a run killed after logging epoch 3, before its checkpoint
    stray.add_scalar("train_loss", 999.0, 3)
    stray.close()
    train(_config(out, 3), resume=True, make_figures=False)
    _same_as_metrics(out)


def test_without_the_package_the_flag_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    cli = load_script("run")
    out = tmp_path / "run"
    assert cli.main(["--tensorboard", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[tensorboard]"' in err, err
    assert not out.exists()
