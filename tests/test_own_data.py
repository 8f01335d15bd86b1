"""The own-data defaults (pyro_gmvae.autoconfig) and the own-data benchmark script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from pyro_gmvae.autoconfig import is_unit_interval, kmeans_hungarian, npz_defaults
from pyro_gmvae.config import Config
from pyro_gmvae.data import Dataset, standardize_features

REPO = Path(__file__).resolve().parents[1]


def _own_data():
    return load_script("own_data")


def test_likelihood_from_value_range():
    rng = np.random.default_rng(0)
    assert npz_defaults(rng.random((500, 20)))["likelihood"] == "bernoulli"
    assert npz_defaults(np.zeros((500, 20)))["likelihood"] == "bernoulli"  # the closed interval
    assert npz_defaults(rng.normal(size=(500, 20)))["likelihood"] == "gaussian"
    assert npz_defaults(rng.random((500, 20)) * 1.01)["likelihood"] == "gaussian"
    assert not is_unit_interval(np.array([[0.5, -1e-3]]))


def test_sizes_scale_with_data():
    small, large = npz_defaults(np.ones((100, 4)) * 2), npz_defaults(np.ones((20000, 784)) * 2)
    assert small["hidden_dim"] < large["hidden_dim"] <= 512
    assert small["batch_size"] < large["batch_size"] <= 256
    # the start is about the same number of optimiser steps: more epochs on less data
    assert small["pretrain_epochs"] > large["pretrain_epochs"]
    assert small["epochs"] >= large["epochs"]
    assert npz_defaults(np.ones((10, 3)) * 2)["batch_size"] <= 10  # never above N
    # images (N, C, H, W) count every value as a feature
    assert npz_defaults(np.ones((1000, 1, 28, 28)))["hidden_dim"] == npz_defaults(np.ones((1000, 784)))["hidden_dim"]


def test_defaults_deterministic_and_valid_config():
    x = np.random.default_rng(1).normal(size=(300, 7))
    first, second = npz_defaults(x, num_clusters=3), npz_defaults(x.copy(), num_clusters=3)
    assert first == second
    config = Config(data="own.npz", K=3, **first).resolved()
    for key, value in first.items():
        assert getattr(config, key) == value
    assert npz_defaults(x, num_clusters=10)["batch_size"] >= 40  # room for every cluster in a batch


def test_standardize_uses_training_statistics():
    rng = np.random.default_rng(0)
    x_train = rng.normal(5.0, 3.0, size=(200, 3))
    x_train[:, 2] = 7.0  # a constant feature is only centred
    x_test = rng.normal(5.0, 3.0, size=(50, 3))
    t = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    data = Dataset("d", t(x_train), None, t(x_test), None)
    standardize_features(data)
    s_train, s_test = data.x.numpy(), data.x_test.numpy()
    assert data.x.dtype == torch.float32
    np.testing.assert_allclose(s_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(s_train[:, :2].std(0), 1.0, atol=1e-5)
    assert np.all(s_train[:, 2] == 0)
    expected = (x_test - x_train.mean(0)) / np.where(x_train.std(0) < 1e-8, 1.0, x_train.std(0))
    np.testing.assert_allclose(s_test, expected, rtol=1e-5, atol=1e-5)
    mean, std = data.scaling  # the raw features come back (the k-means baseline uses them)
    np.testing.assert_allclose((data.x * std + mean).numpy(), x_train, rtol=1e-5, atol=1e-4)


def test_npz_run_resolves_its_options_from_the_data(tmp_path):
    """No flags but K: the likelihood, sizes, start and scaling come from the training split."""
    from pyro_gmvae.training import _resolve

    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    x = (np.eye(3)[labels] @ rng.normal(size=(3, 5)) * 4 + 50 + rng.normal(size=(300, 5))).astype(np.float32)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x[:240], labels=labels[:240], x_test=x[240:], labels_test=labels[240:])
    config, data, split = _resolve(Config(data=str(path), K=3, epochs=7), None)
    expected = npz_defaults(x[:240], 3)
    assert split and {k: getattr(config, k) for k in expected if k != "epochs"} == {
        k: v for k, v in expected.items() if k != "epochs"
    }
    assert config.epochs == 7  # what the user set wins
    assert config.likelihood == "gaussian" and config.standardize == "features"
    grey = tmp_path / "grey.npz"
    np.savez(grey, x=rng.random((200, 6)).astype(np.float32))
    config, _, _ = _resolve(Config(data=str(grey), K=2), None)
    assert config.likelihood == "bernoulli" and config.standardize == "none"
    assert Config(data="mnist").resolved().standardize == "none"


def test_kmeans_baseline_on_separated_blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.arange(300) % 3
    x = centres[labels] + rng.normal(size=(300, 2))
    assert kmeans_hungarian(x[:200], x[200:], labels[200:], 3) == 1.0


def test_validation_split_never_reads_test(tmp_path):
    own_data = _own_data()
    path = tmp_path / "toy.npz"
    x = np.arange(100, dtype=np.float32)[:, None]
    np.savez(path, x=x, labels=np.arange(100) % 2, x_test=-x[:10], labels_test=np.zeros(10, dtype=np.int64))
    x_tr, _, x_val, _ = own_data.load_split(path, val=True)
    assert len(x_tr) == 80 and len(x_val) == 20 and x_val.min() >= 80  # the last 20 % of train
    assert own_data.load_split(path, val=False)[2].max() <= 0  # the test split


def test_sklearn_sets_are_seeded_and_stratified():
    own_data = _own_data()
    first, second = own_data.make_set("iris"), own_data.make_set("iris")
    np.testing.assert_array_equal(first["x"], second["x"])
    assert len(first["x"]) == 105 and len(first["x_test"]) == 45
    assert np.bincount(first["labels_test"]).tolist() == [15, 15, 15]


@pytest.mark.slow
def test_end_to_end_blobs(tmp_path):
    own_data = _own_data()
    out_json = tmp_path / "own.json"
    args = ["--only", "blobs", "--seeds", "0", "--val", "--out-json", str(out_json), "--cache", str(tmp_path)]
    args += ["--runs", str(tmp_path / "runs"), "--set", "pretrain_epochs=5", "init_fit_epochs=2", "epochs=2"]
    assert own_data.main(args) == 0
    entry = json.loads(out_json.read_text())["blobs"]
    assert entry["K"] == 3 and entry["kmeans_hungarian"] > 0.9
    assert entry["acc_hungarian"] > 0.8
    assert entry["config_seed0"]["likelihood"] == "gaussian"


def test_mnist_subset_when_available():
    from pyro_gmvae.data import default_data_root

    if not (Path(default_data_root()) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip("MNIST not found under $PYRO_GMVAE_DATA")
    arrays = _own_data().make_set("mnist10k")
    assert arrays["x"].shape == (10000, 784) and arrays["x_test"].shape == (2000, 784)
    assert 0.0 <= arrays["x"].min() and arrays["x"].max() <= 1.0
    assert npz_defaults(arrays["x"], 10)["likelihood"] == "bernoulli"


def test_every_labelled_run_reports_the_kmeans_baseline(tmp_path):
    from pyro_gmvae import train
    from pyro_gmvae.autoconfig import kmeans_baseline
    from pyro_gmvae.data import prepare_data

    config = Config(epochs=1, out=str(tmp_path / "run"), progress=False, train_subset=400, test_subset=200)
    run = train(config, make_figures=False)
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    data = prepare_data(run.config)
    assert final["kmeans_hungarian"] == kmeans_baseline(data, run.config.K, run.config.seed)
    assert 0.2 < final["kmeans_hungarian"] <= 1.0


def test_show_config_prints_what_a_npz_run_would_use(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=(rng.normal(size=(300, 5)) * 7 + 20).astype(np.float32))
    assert load_script("run").main(["--data", str(path), "--K", "3", "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = npz_defaults(np.load(path)["x"][:270], 3)  # the training split: all but the last 10 %
    assert {k: shown[k] for k in expected} == expected and shown["standardize"] == "features"


def test_overrides_read_json_values_and_keep_words():
    own_data = load_script("own_data")
    parsed = own_data.parse_overrides(["batch_size=64", "lr=3e-4", "adam_kernel=fused", "prior=learned", "x=null"])
    assert parsed == {"batch_size": 64, "lr": 3e-4, "adam_kernel": "fused", "prior": "learned", "x": None}
