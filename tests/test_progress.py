"""Every long phase shows something (a bar or a status line), nothing when progress is off,
and showing it changes no result."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from pyro_gmvae import Config, partition, train
from pyro_gmvae.progress import status


def test_status_line_shows_the_phase_and_its_time(capsys):
    with status("partition: k-means of 5 points", True, refresh=0.05) as line:
        time.sleep(0.3)  # the helper thread redraws meanwhile
        line.set_description_str("partition: k-means, second half")
    err = capsys.readouterr().err
    assert "partition: k-means of 5 points [00:00]" in err
    assert err.count("partition: k-means of 5 points") >= 3, err  # redrawn while the block ran
    assert err.rstrip().endswith("partition: k-means, second half [00:00]")
    assert not [t for t in threading.enumerate() if t.name == "pyro_gmvae-status"]


def test_status_line_off_draws_nothing_and_starts_no_thread(capsys):
    before = threading.active_count()
    with status("partition: k-means", False):
        assert threading.active_count() == before
    assert capsys.readouterr().err == ""


def test_partition_shows_umap_and_kmeans_and_gives_the_same_labels(monkeypatch, capsys):
    loc = torch.as_tensor(np.random.default_rng(0).normal(size=(300, 4)))
    quiet = partition.partition_latents(loc, 3, seed=0, method="kmeans")
    assert capsys.readouterr().err == ""
    shown = partition.partition_latents(loc, 3, seed=0, method="kmeans", progress=True)
    assert "partition: k-means (K=3, 10 restarts) of 300 latent means [" in capsys.readouterr().err
    assert torch.equal(quiet["labels"], shown["labels"]) and quiet["inertia"] == shown["inertia"]

    monkeypatch.setattr(partition, "_umap_embedding", lambda points, seed: points[:, :2])  # UMAP's speed aside
    partition.partition_latents(loc, 3, seed=0, method="umap", progress=True)
    err = capsys.readouterr().err
    assert "partition: UMAP embedding of 300 latent means [" in err
    assert "partition: k-means (K=3, 10 restarts) of 300 embedded means [" in err


def test_training_shows_its_bars_and_the_evaluation(tmp_path, capsys):
    config = Config(epochs=1, train_subset=400, test_subset=100, init="vae-kmeans", pretrain_epochs=1)
    train(Config(**{**config.to_dict(), "out": str(tmp_path / "shown")}), make_figures=False)
    err = capsys.readouterr().err
    for line in ("VAE pretraining", "partition: k-means (K=8, 10 restarts) of 400 latent means [",
                 "evaluating the start on 100 test examples [", "evaluating on 100 test examples"):  # fmt: skip
        assert line in err, line
    train(Config(**{**config.to_dict(), "out": str(tmp_path / "quiet"), "progress": False}), make_figures=False)
    assert capsys.readouterr().err == ""
