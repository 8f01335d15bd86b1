"""Semi-supervised training (``--labels N``): the label draw, the labelled objective against
hand-written mathematics in float64, a short run on an easy set, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.distributions as td
from conftest import load_script

from pyro_gmvae import Config, train
from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.data import Dataset
from pyro_gmvae.semisupervised import (
    LABELS_NAME,
    SemiSupervisedLoss,
    classifier_loss,
    draw_labels,
    supervised_elbo,
)

REPO = Path(__file__).resolve().parents[1]
K, HIDDEN, X_DIM, W_DIM, DATA_DIM, BATCH = 3, 8, 2, 2, 4, 8
GUIDES = ("v2", "v1")


def blobs(num_train: int = 600, num_test: int = 300, seed: int = 0) -> Dataset:
    """Three well separated 4-D Gaussian blobs, labelled 0, 1, 2."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])

    def split(n):
        labels = torch.randint(3, (n,), generator=gen)
        return centres[labels] + 0.3 * torch.randn(n, 4, generator=gen), labels

    (x, labels), (x_test, labels_test) = split(num_train), split(num_test)
    return Dataset("blobs", x, labels, x_test, labels_test)


# --- the draw ---------------------------------------------------------------------------
def test_draw_is_balanced_seeded_and_without_repeats():
    labels = torch.arange(90) % 3
    one = draw_labels(labels, 10, seed=0)
    assert len(one) == len(set(one.tolist())) == 10
    assert sorted(torch.bincount(labels[one], minlength=3).tolist()) == [3, 3, 4]
    assert torch.equal(one, draw_labels(labels, 10, seed=0))
    assert not torch.equal(one, draw_labels(labels, 10, seed=1))
    exact = draw_labels(labels, 9, seed=2)
    assert torch.bincount(labels[exact], minlength=3).tolist() == [3, 3, 3]


# --- the objective in float64 ------------------------------------------------------------
def build(guide: str, **reg):
    config = Config(
        data="spiral", K=K, hidden_dim=HIDDEN, x_dim=X_DIM, w_dim=W_DIM, guide=guide, prior="learned", **reg
    ).resolved()
    model, guide_module = build_model_and_guide(config, (DATA_DIM,))
    model.double()
    guide_module.double()
    with torch.no_grad():  # non-uniform pi, so log pi_c enters
        model.prior.logits.copy_(torch.tensor([0.8, -0.5, 0.1], dtype=torch.float64))
    return model, guide_module


def hand_supervised_loss(model, guide, y, labels, w, x):
    """-sum_b [log p(y|x) + log N(x; mu_c(w), sigma_c(w)) + log pi_c + log N(w; 0, I) - log q(x|y) - log q(w|y)]."""
    q = guide.encode(y)
    loc, scale = model.prior.components(w)  # (B, K, Dx)
    rows = torch.arange(len(y))
    log_pi = torch.log_softmax(model.prior.logits, -1)[labels]
    log_px = td.Normal(loc[rows, labels], scale[rows, labels]).log_prob(x).sum(-1)
    log_pw = td.Normal(torch.zeros_like(w), torch.ones_like(w)).log_prob(w).sum(-1)
    log_qx = td.Normal(q["x_loc"], q["x_scale"]).log_prob(x).sum(-1)
    log_qw = td.Normal(q["w_loc"], q["w_scale"]).log_prob(w).sum(-1)
    recon = model.p_y(x).log_prob(y)
    return -(recon + log_px + log_pi + log_pw - log_qx - log_qw).sum()


@pytest.mark.parametrize("guide_name", GUIDES)
@pytest.mark.parametrize("reg", [{}, dict(z_prior_weight=1.7, cv_weight=0.3, free_bits=0.1)])
def test_supervised_elbo_matches_the_hand_written_bound(tiny_mixture, guide_name, reg):
    model, guide = build(guide_name, **reg)
    y = tiny_mixture[0][:BATCH].double()
    labels = tiny_mixture[1][:BATCH]
    pyro.set_rng_seed(3)
    trace = poutine.trace(guide).get_trace(y, labels=labels)
    assert "z" not in trace.nodes  # z is observed in the model, not sampled by the guide
    w, x = trace.nodes["w"]["value"].detach(), trace.nodes["x"]["value"].detach()
    pyro.set_rng_seed(3)
    loss = supervised_elbo(1).differentiable_loss(model, guide, y, labels=labels)
    # The regularisers of the cluster posterior do not touch labelled examples.
    expected = hand_supervised_loss(model, guide, y, labels, w, x)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("guide_name", GUIDES)
def test_classifier_term_is_the_guides_cluster_posterior(tiny_mixture, guide_name):
    model, guide = build(guide_name)
    y = tiny_mixture[0][:BATCH].double()
    labels = tiny_mixture[1][:BATCH]
    q = guide.encode(y)
    if guide_name == "v1":  # q(z | y)
        log_r = torch.log_softmax(q["z_logits"], -1)
    else:  # p(z | x, w) at the posterior means, by Bayes' rule
        loc, scale = model.prior.components(q["w_loc"])
        joint = torch.log_softmax(model.prior.logits, -1) + td.Normal(loc, scale).log_prob(
            q["x_loc"].unsqueeze(-2)
        ).sum(-1)
        log_r = joint - joint.logsumexp(-1, keepdim=True)
    expected = -log_r[torch.arange(BATCH), labels]
    assert torch.allclose(classifier_loss(model, guide, y, labels), expected, rtol=1e-12)

    # The step loss: unlabelled mean + labelled mean + label_weight * classifier mean.
    from pyro_gmvae.objective import make_elbo

    module = SemiSupervisedLoss(make_elbo(1)(model, guide), model, guide, label_weight=0.7)
    pyro.set_rng_seed(5)
    got = module(y, y, labels)
    pyro.set_rng_seed(5)
    unsup = make_elbo(1).differentiable_loss(model, guide, y) / BATCH
    sup = supervised_elbo(1).differentiable_loss(model, guide, y, labels=labels) / BATCH
    assert torch.allclose(got, unsup + sup + 0.7 * expected.mean(), rtol=1e-12)


# --- a short run ------------------------------------------------------------------------
SMALL = dict(
    data="blobs.npz", K=3, x_dim=2, w_dim=2, hidden_dim=32, batch_size=50, lr=3e-3, progress=False, init="random"
)


@pytest.mark.parametrize("guide", GUIDES)
def test_a_few_labels_fix_the_cluster_to_class_map(tmp_path, guide):
    data = blobs()
    run = train(
        Config(labels=6, epochs=6, guide=guide, out=str(tmp_path / "run"), **SMALL), data=data, make_figures=False
    )
    assert run.final["acc_supervised"] >= 0.95  # plain accuracy: cluster c is class c
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("acc_supervised" in row and "acc_hungarian" in row for row in rows)
    record = json.loads((tmp_path / "run" / LABELS_NAME).read_text())
    assert record["num_labels"] == 6 and record["per_class"] == [2, 2, 2] and record["seed"] == 0
    assert record["indices"] == draw_labels(data.labels, 6, seed=0).tolist()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["labels"] == 6


def test_unsupervised_run_writes_no_labels(tmp_path):
    run = train(Config(epochs=1, out=str(tmp_path / "run"), **SMALL), data=blobs(), make_figures=False)
    assert "acc_supervised" not in run.final and "acc_supervised" not in run.history[-1]
    assert not (tmp_path / "run" / LABELS_NAME).exists()


# --- refusals ---------------------------------------------------------------------------
@pytest.fixture
def main():
    """``main`` of experiments/run.py, run in this process."""
    return load_script("run").main


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--labels", "10"], "--labels needs --K equal to the number of classes (5 in spiral), got --K 8"),
        (["--labels", "700", "--K", "5"], "--labels 700 exceeds the 600 training examples"),
        (["--labels", "560", "--K", "5"], "--labels 560 needs 112 examples of every class, but class 1 has 101"),
        (["--labels", "450", "--K", "5"], "leaves 150 unlabelled examples, fewer than the batch size 200"),
    ],
)
def test_cli_refuses_labels_it_cannot_serve(main, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--train-subset", "600", "--test-subset", "100", "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_labels_without_labelled_data(main, tmp_path, capsys):
    file = tmp_path / "plain.npz"
    np.savez(file, x=np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32))
    assert main(["--data", str(file), "--labels", "10", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--labels 10 needs labelled training data; plain has no labels" in err


# --- the grid ---------------------------------------------------------------------------
def _experiment(name: str):
    return load_script(name)


def test_semisup_grid_and_its_summary(tmp_path):
    reproduce = _experiment("reproduce")
    settings = reproduce.grid_settings("semisup")
    assert [s["labels"] for s in settings] == [100, 600, 1000, 3000] and reproduce.GRIDS["semisup"]["seeds"] == 3
    names = {reproduce.setting_name(s, None) for s in settings}
    assert len(names) == 4  # every N trains into its own cells
    entry = dict(grid="semisup", config=settings[0], epochs=20, train_subset=None, test_subset=None, machine=None)
    draws = [dict(seed=s, acc_supervised=a, acc_hungarian=a, nmi=0.8, commit=None) for s, a in enumerate((0.9, 0.94))]
    grid_json = tmp_path / "mnist.json"
    grid_json.write_text(json.dumps({"settings": {"one": {**entry, "per_seed": draws}}}))
    out = _experiment("semisupervised").collect(grid_json, None, None)
    acc = out["100"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.92) and acc["std"] == pytest.approx(0.02 * 2**0.5)
    assert [d["accuracy"] for d in acc["per_draw"]] == [0.9, 0.94] and out["100"]["m2_tutorial_percent"] == 93.19


def test_labels_start_at_random_unless_told():
    # A vae-* start orders the components arbitrarily; the labels order them, so the preset's
    # start gives way, while an --init the user gives is kept.
    resolved = Config(data="mnist", labels=100).resolved()
    assert (resolved.init, resolved.init_restarts, resolved.init_fit_epochs) == ("random", 1, 0)
    assert Config(data="mnist", labels=100, init="vae-kmeans").resolved().init == "vae-kmeans"
    assert Config(data="mnist").resolved().init == "vae-umap"


def test_labels_turn_the_npz_balance_term_off_unless_told():
    from pyro_gmvae.autoconfig import npz_defaults

    auto = npz_defaults(np.random.default_rng(0).normal(size=(300, 4)), 3)
    assert Config(data="my.npz").resolved(auto).balance_weight == 10.0
    assert Config(data="my.npz", labels=30).resolved(auto).balance_weight == 0.0
    assert Config(data="my.npz", labels=30, balance_weight=2.0).resolved(auto).balance_weight == 2.0


def test_number_by_labels_renumbers_clusters_to_classes():
    from pyro_gmvae.partition import number_by_labels

    classes_of_all = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    assignments = torch.tensor([2, 2, 0, 0, 1, 1, 0])  # cluster 2 holds class 0, 0 holds 1, 1 holds 2
    indices = torch.tensor([0, 2, 4, 9])  # 9: beyond the partitioned examples, ignored
    classes = torch.tensor([0, 1, 2, 1])
    renumbered = number_by_labels(assignments, indices, classes, 3)
    assert renumbered.tolist() == [0, 0, 1, 1, 2, 2, 1]
    assert (renumbered[:6] == classes_of_all[:6]).all()


def test_a_vae_start_is_numbered_by_the_labels(tmp_path):
    """With --labels and --init vae-*, cluster c of the start holds class c: one epoch suffices."""
    options = {**SMALL, "init": "vae-kmeans", "pretrain_epochs": 3, "init_fit_epochs": 1}
    config = Config(labels=6, epochs=1, out=str(tmp_path / "run"), **options)
    run = train(config, data=blobs(), make_figures=False)
    assert run.final["acc_supervised"] >= 0.95


def test_pseudo_labels_observe_the_starts_confident_assignments_and_resume(tmp_path):
    """--pseudo-labels N reads no label: it observes the start's own clusters for its N most
    confident examples (N / K per cluster), saves them, and a resumed run uses the same ones."""
    options = {**SMALL, "init": "vae-kmeans", "pretrain_epochs": 3, "init_fit_epochs": 1}
    data = blobs()
    config = Config(pseudo_labels=30, label_weight=5.0, epochs=2, out=str(tmp_path / "one"), **options)
    one = train(config, data=blobs(), make_figures=False)
    record = json.loads((tmp_path / "one" / LABELS_NAME).read_text())
    assert record["kind"] == "pseudo-labels" and record["num_labels"] == 30 and record["per_class"] == [10, 10, 10]
    assert "acc_supervised" not in one.final  # no true labels: only the unsupervised metrics
    # The observed clusters are the start's, not the data's labels (cluster ids are arbitrary).
    observed, true = torch.tensor(record["classes"]), data.labels[record["indices"]]
    assert (torch.bincount(observed * 3 + true, minlength=9).reshape(3, 3) > 0).sum() == 3  # one class per cluster
    half = Config(pseudo_labels=30, label_weight=5.0, epochs=1, out=str(tmp_path / "two"), **options)
    train(half, data=blobs(), make_figures=False)
    resumed = train(Config(**{**half.to_dict(), "epochs": 2}), resume=True, data=blobs(), make_figures=False)
    assert resumed.history[-1]["train_loss"] == one.history[-1]["train_loss"]
    with pytest.raises(Exception, match="--pseudo-labels needs"):
        train(Config(pseudo_labels=30, epochs=1, out=str(tmp_path / "r"), **SMALL), data=blobs())
