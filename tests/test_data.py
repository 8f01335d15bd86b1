"""Data loaders end to end: genuine MNIST from $PYRO_GMVAE_DATA, a synthetic SVHN file in
SVHN's own .mat format, and a user's .npz, each trained for one short epoch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, requires_mnist

from pyro_gmvae import Config, train
from pyro_gmvae.data import load_mnist, load_svhn

RUN_FILES = ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.pt")
FINAL_KEYS = {"acc_paper", "acc_hungarian", "purity", "nmi", "ari", "elbo", "clusters_used", "epochs", "seconds"}


def _cli():
    return load_script("run")


def _check_run_folder(out: Path, figures: tuple[str, ...], epochs: int = 1) -> dict:
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    for name in figures:
        path = out / "figures" / name
        assert path.is_file() and path.stat().st_size > 1000, name
    final = json.loads((out / "metrics.json").read_text())
    assert FINAL_KEYS <= set(final)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    for term in ("recon", "cond_prior", "w_prior", "z_prior", "cv", "test_elbo"):
        assert np.isfinite(rows[-1][term]), term
    return final


@requires_mnist
def test_mnist_loader_reads_the_real_files():
    data = load_mnist(os.environ["PYRO_GMVAE_DATA"])
    assert data.x.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.x.dtype == torch.float32
    assert 0.0 == data.x.min() and data.x.max() == 1.0
    # grey levels are kept (no binarisation)
    assert ((data.x > 0) & (data.x < 1)).any()
    assert data.labels.shape == (60000,) and data.labels_test.shape == (10000,)
    assert set(data.labels.unique().tolist()) == set(range(10))


@requires_mnist
def test_mnist_smoke_run_writes_the_run_folder(tmp_path):
    out = tmp_path / "mnist"
    config = Config(
        data="mnist",
        network="fc",
        K=10,
        epochs=1,
        train_subset=500,
        test_subset=200,
        hidden_dim=64,
        x_dim=8,
        w_dim=8,
        batch_size=50,
        progress=False,
        out=str(out),
    )
    result = train(config)
    final = _check_run_folder(out, ("losses.png", "accuracy.png", "samples.png"))
    assert final["epochs"] == 1
    assert 0.0 <= final["acc_hungarian"] <= 1.0 and 1 <= final["clusters_used"] <= 10
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"] == "mnist" and saved["K"] == 10 and saved["likelihood"] == "bernoulli"
    # The mnist preset starts from a VAE pretrained for 10 epochs, its components seated on
    # k-means of a UMAP embedding of the latent means and fitted to that partition.
    assert saved["init"] == "vae-umap" and saved["kl_warmup"] == 0 and saved["init_restarts"] == 1
    start = json.loads((out / "init.json").read_text())
    assert len(start["pretrain_loss"]) == 10 and 0.0 <= start["test_at_init"]["acc_hungarian"] <= 1.0
    assert len(start["fit"]["cross_entropy"]) == 3 and "restarts" not in start
    assert result.final == final


def write_svhn_mat(folder: Path, split: str, num: int, seed: int) -> np.ndarray:
    """A tiny file in SVHN's own layout: X (32, 32, 3, N) uint8, y (N, 1) in 1..10, 10 = digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, num), dtype=np.uint8)
    y = (np.arange(num) % 10 + 1).reshape(num, 1).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return x


@pytest.fixture
def svhn_root(tmp_path):
    root = tmp_path / "data"
    write_svhn_mat(root / "svhn", "train", 64, seed=0)
    write_svhn_mat(root / "svhn", "test", 20, seed=1)
    return root


def test_svhn_loader_reads_the_mat_format(svhn_root):
    data = load_svhn(str(svhn_root))
    assert data.x.shape == (64, 3, 32, 32) and data.x_test.shape == (20, 3, 32, 32)
    assert data.x.dtype == torch.float32 and 0 <= data.x.min() and data.x.max() <= 1
    # torchvision maps label 10 to digit 0
    assert data.labels[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    # pixel (row 3, col 5, channel 2) of image 7 comes through unchanged
    from scipy.io import loadmat

    raw = loadmat(svhn_root / "svhn" / "train_32x32.mat")["X"]
    assert data.x[7, 2, 3, 5].item() == pytest.approx(raw[3, 5, 2, 7] / 255.0)


def test_svhn_trains_one_epoch_with_the_conv_network(svhn_root, tmp_path):
    out = tmp_path / "svhn-run"
    config = Config(
        data="svhn",
        data_root=str(svhn_root),
        network="conv",
        K=4,
        epochs=1,
        hidden_dim=16,
        x_dim=4,
        w_dim=3,
        batch_size=16,
        progress=False,
        out=str(out),
    )
    train(config)
    final = _check_run_folder(out, ("losses.png", "accuracy.png", "samples.png"))
    assert final["epochs"] == 1 and np.isfinite(final["elbo"])


def test_missing_svhn_says_where(tmp_path, capsys):
    code = _cli().main(
        [
            "--data",
            "svhn",
            "--data-root",
            str(tmp_path),
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    assert "SVHN train split not found" in capsys.readouterr().err


def test_npz_trains_one_epoch_through_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.arange(120) % 3
    x = (np.eye(3)[labels] @ rng.normal(size=(3, 6)) * 3 + 0.3 * rng.normal(size=(120, 6))).astype(np.float32)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x[:100], labels=labels[:100], x_test=x[100:], labels_test=labels[100:])
    out = tmp_path / "npz-run"
    code = _cli().main(
        [
            "--data",
            str(path),
            "--epochs",
            "1",
            "--K",
            "3",
            "--x-dim",
            "2",
            "--w-dim",
            "2",
            "--hidden-dim",
            "16",
            "--batch-size",
            "20",
            "--init",
            "random",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    final = _check_run_folder(out, ("losses.png", "accuracy.png"))
    assert 0 <= final["acc_hungarian"] <= 1


def test_validation_holds_out_the_last_training_examples():
    """--validation N evaluates on the last N training examples; the test split is not used."""
    from pyro_gmvae.data import prepare_data
    from pyro_gmvae.errors import UserInputError

    config = Config(data="spiral", validation=500, train_subset=1000).resolved()
    data = prepare_data(config)
    full = prepare_data(Config(data="spiral").resolved())
    assert torch.equal(data.x_test, full.x[-500:]) and torch.equal(data.labels_test, full.labels[-500:])
    assert torch.equal(data.x, full.x[:1000])  # the subset is taken from what is left
    with pytest.raises(UserInputError, match="leaves no training examples"):
        prepare_data(Config(data="spiral", validation=len(full.x)).resolved())
