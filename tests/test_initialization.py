"""``--init vae-kmeans|vae-umap``: VAE pretraining of the x-path, components seated on a partition."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pyro_gmvae import Config, train
from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.errors import NonFiniteLossError, UserInputError
from pyro_gmvae.initialization import (
    fit_to_partition,
    partition_latents,
    pretrain_vae,
    probe_start,
    seat_components,
)
from pyro_gmvae.networks import SCALE_FLOOR

SMALL = dict(data="spiral", train_subset=600, test_subset=200, seed=2, progress=False)


def _model_and_guide(K=3, x_dim=4, data_shape=(6,)):
    config = Config(data="x.npz", K=K, x_dim=x_dim, w_dim=3, hidden_dim=16).resolved()
    return build_model_and_guide(config, data_shape)


def _blobs(n=300, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0] * 6, [-4.0] * 6, [4.0, -4.0] * 3])
    labels = torch.arange(n) % 3
    return centres[labels] + 0.3 * torch.randn(n, 6, generator=g), labels


def test_seated_components_are_the_moment_matched_kmeans_clusters():
    torch.manual_seed(0)
    model, guide = _model_and_guide()
    y, _ = _blobs()
    guide.eval()
    q = guide.encode(y)
    loc, var = q["x_loc"].detach(), q["x_scale"].detach() ** 2

    seated = seat_components(model, guide, y, seed=0, shrink=0.0)
    labels = seated["assignments"]
    assert labels.shape == (len(y),) and set(labels.tolist()) == {0, 1, 2}

    # With shrink 0 the components no longer depend on w: any w gives the seated values.
    comp_loc, comp_scale = model.prior.components(torch.randn(5, 3))
    for k in range(3):
        members = labels == k
        centroid = loc[members].mean(0)
        spread = (loc[members] ** 2 + var[members]).mean(0) - centroid**2
        torch.testing.assert_close(comp_loc[:, k], centroid.expand(5, -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(comp_scale[:, k], spread.sqrt().expand(5, -1), rtol=1e-4, atol=1e-5)
    assert (comp_scale >= 2 * SCALE_FLOOR - 1e-6).all()


def test_seating_keeps_a_shrunk_w_dependence_and_the_kmeans_partition():
    torch.manual_seed(1)
    model, guide = _model_and_guide()
    y, blob = _blobs()
    weight = model.prior.network.loc_head.weight.detach().clone()
    seated = seat_components(model, guide, y, seed=0, shrink=0.1)
    torch.testing.assert_close(model.prior.network.loc_head.weight, 0.1 * weight)
    # Well separated blobs: k-means on the (random) encoder's means recovers them, and the
    # seated model's cluster posterior at the encoder means agrees with k-means.
    contingency = np.zeros((3, 3), dtype=int)
    np.add.at(contingency, (seated["assignments"].numpy(), blob.numpy()), 1)
    assert (contingency.max(0) == 100).all()
    guide.eval()
    q = guide.encode(y)
    # q(w | y) starts at the prior N(0, I), up to the scale floor.
    assert torch.equal(q["w_loc"], torch.zeros_like(q["w_loc"]))
    torch.testing.assert_close(q["w_scale"], torch.ones_like(q["w_scale"]))
    r = model.cluster_log_posterior(q["x_loc"], q["w_loc"]).argmax(-1)
    assert (r == seated["assignments"]).float().mean() > 0.95


@pytest.mark.parametrize("prior", ["uniform", "learned", "tied"])
def test_init_weights_partition_sets_pi_to_the_partition_proportions(prior):
    torch.manual_seed(0)
    config = Config(data="x.npz", K=3, x_dim=4, w_dim=3, hidden_dim=16, prior=prior).resolved()
    model, guide = build_model_and_guide(config, (6,))
    y, _ = _blobs(n=240)
    y = torch.cat([y, y[y[:, 0] > 0][:60]])  # clusters of unequal size
    uniform = model.prior.cluster_log_weights().clone()
    seat_components(model, guide, y, seed=0, shrink=0.1)  # the default keeps pi
    assert torch.equal(model.prior.cluster_log_weights(), uniform)
    seated = seat_components(model, guide, y, seed=0, shrink=0.1, weights=True)
    proportions = torch.bincount(seated["assignments"], minlength=3).double() / len(y)
    assert len(set(proportions.tolist())) > 1
    torch.testing.assert_close(model.prior.cluster_log_weights().double(), proportions.log(), rtol=0, atol=1e-6)
    assert ("logits" in dict(model.prior.named_parameters())) == (prior == "learned")  # learned pi trains on
    with pytest.raises(ValueError, match="3 positive values"):
        model.prior.set_cluster_weights(torch.tensor([0.5, 0.5, 0.0]))


def test_init_weights_partition_needs_a_vae_start():
    assert Config(data="x.npz", init="random").resolved().init_weights == "uniform"
    with pytest.raises(UserInputError, match="--init-weights needs --init vae-kmeans or vae-umap"):
        Config(data="spiral", init="random", init_weights="partition").resolved().validate()


def test_seating_needs_k_examples():
    model, guide = _model_and_guide(K=3)
    with pytest.raises(UserInputError, match="at least K=3"):
        seat_components(model, guide, torch.randn(2, 6), seed=0)


def test_pretraining_fits_the_x_path_only():
    torch.manual_seed(0)
    model, guide = _model_and_guide()
    y, _ = _blobs()
    untouched = {
        "w_loc": guide.encoder.w_loc,
        "w_scale": guide.encoder.w_scale,
        "prior": model.prior.network,
    }
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in untouched.items()}
    trunk_before = [p.detach().clone() for p in guide.encoder.trunk.parameters()]
    losses = pretrain_vae(model, guide, y, epochs=6, batch_size=50, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 6 and losses[-1] < losses[0]
    for k, m in untouched.items():
        for a, b in zip(before[k], m.parameters(), strict=True):
            assert torch.equal(a, b), f"{k} changed during pretraining"
    assert any(not torch.equal(a, b) for a, b in zip(trunk_before, guide.encoder.trunk.parameters(), strict=True))


def test_inverse_softplus_round_trip():
    from pyro_gmvae.partition import _inverse_softplus

    t = torch.tensor([1e-4, 0.1, 1.0, 30.0, 200.0], dtype=torch.float64)
    torch.testing.assert_close(F.softplus(_inverse_softplus(t)), t)


def test_init_run_records_its_start_and_resumes_without_pretraining_again(tmp_path):
    config = dict(epochs=2, init="vae-kmeans", pretrain_epochs=2, **SMALL)
    one_go = train(Config(out=str(tmp_path / "one"), **config), make_figures=False)
    record = json.loads((tmp_path / "one" / "init.json").read_text())
    assert record["init"] == "vae-kmeans" and len(record["pretrain_loss"]) == 2
    assert 0 <= record["test_at_init"]["acc_hungarian"] <= 1
    assert record["test_at_init"]["clusters_used"] >= 1

    # Same seed, same start and same run.
    again = train(Config(out=str(tmp_path / "again"), **config), make_figures=False)
    assert json.loads((tmp_path / "again" / "init.json").read_text())["test_at_init"] == record["test_at_init"]
    for a, b in zip(one_go.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # Resuming continues from the checkpoint: init.json is not rewritten.
    half = tmp_path / "half"
    train(Config(out=str(half), **{**config, "epochs": 1}), make_figures=False)
    stamp = (half / "init.json").stat().st_mtime_ns
    resumed = train(Config(out=str(half), **config), resume=True, make_figures=False)
    assert (half / "init.json").stat().st_mtime_ns == stamp
    for a, b in zip(one_go.guide.state_dict().values(), resumed.guide.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_default_init_writes_no_record(tmp_path):
    train(Config(out=str(tmp_path / "r"), epochs=1, **SMALL), make_figures=False)
    assert not (tmp_path / "r" / "init.json").exists()


def test_probe_scores_a_trained_copy_and_leaves_the_start_untouched():
    torch.manual_seed(3)
    model, guide = _model_and_guide()
    y, _ = _blobs()
    seat_components(model, guide, y, seed=0)
    before = [t.clone() for t in (*model.state_dict().values(), *guide.state_dict().values())]
    score = probe_start(model, guide, y, epochs=2, batch_size=50, lr=1e-3, num_particles=1, generator=torch.Generator())
    after = [*model.state_dict().values(), *guide.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert np.isfinite(score["loss"]) and 0 <= score["cluster_entropy"] <= np.log(3) + 1e-6


def test_restarts_keep_the_start_with_the_lowest_probe_objective(tmp_path, monkeypatch):
    """The start whose probe scored lowest is the one loaded into the model; its record is init.json's."""
    import pyro_gmvae.initialization as initialization

    scores = iter([5.0, 1.0, 3.0])  # start 1 wins
    seated = []  # each start's seated component locations, as the probe sees them

    def fake_probe(model, *args, **kwargs):
        seated.append(model.state_dict()["prior.network.loc_head.bias"].clone())
        return {"loss": next(scores), "cluster_entropy": 0.5}

    monkeypatch.setattr(initialization, "probe_start", fake_probe)
    run = train(
        Config(out=str(tmp_path / "r"), epochs=1, init="vae-kmeans", pretrain_epochs=1, init_restarts=3, **SMALL),
        make_figures=False,
    )
    record = json.loads((tmp_path / "r" / "init.json").read_text())
    assert record["chosen"] == 1 and len(record["restarts"]) == 3
    assert [r["probe_loss"] for r in record["restarts"]] == [5.0, 1.0, 3.0]
    assert record["test_at_init"] == record["restarts"][1]["test_at_init"]
    assert record["kmeans_inertia"] == record["restarts"][1]["kmeans_inertia"]
    # The run trained one epoch from start 1's seated state: it is nearest to that start.
    trained = run.model.state_dict()["prior.network.loc_head.bias"]
    distances = [float((trained - s).abs().max()) for s in seated]
    assert min(range(3), key=distances.__getitem__) == 1, distances


def test_consensus_keeps_the_start_the_others_agree_with(tmp_path, monkeypatch):
    """--init-select consensus: no probe; the start with the highest mean ARI to the others is loaded."""
    import pyro_gmvae.initialization as initialization
    import pyro_gmvae.partition as partition

    monkeypatch.setattr(initialization, "probe_start", lambda *a, **k: pytest.fail("consensus runs no probe"))
    n = SMALL["train_subset"]  # every training example is partitioned
    base = torch.arange(n) % 3
    first, last = base.clone(), base.clone()  # base with 60 examples moved, at either end
    first[:60] = (first[:60] + 1) % 3
    last[-60:] = (last[-60:] + 1) % 3
    odd = torch.arange(n) * 3 // n  # another partition altogether
    parts = [first, odd, base, last]  # base, start 2, lies between the two perturbed copies
    fixed = iter(parts)
    real = partition.partition_latents
    monkeypatch.setattr(partition, "partition_latents", lambda *a, **k: {**real(*a, **k), "labels": next(fixed)})
    config = dict(
        epochs=1, K=3, init="vae-kmeans", pretrain_epochs=1, init_restarts=4, init_select="consensus", **SMALL
    )
    train(Config(out=str(tmp_path / "r"), **config), make_figures=False)
    record = json.loads((tmp_path / "r" / "init.json").read_text())
    scores = [r["agreement"] for r in record["restarts"]]
    assert record["select"] == "consensus" and "probe_epochs" not in record
    assert scores == pytest.approx(partition.consensus_scores(parts))
    assert record["chosen"] == max(range(4), key=scores.__getitem__) == 2
    assert record["test_at_init"] == record["restarts"][2]["test_at_init"]


def test_consensus_scores_are_mean_adjusted_rand_indices():
    from sklearn.metrics import adjusted_rand_score

    from pyro_gmvae.partition import consensus_scores

    rng = np.random.default_rng(0)
    parts = [torch.as_tensor(rng.integers(0, 4, 50)) for _ in range(4)]
    parts.append(parts[0].clone())
    scores = consensus_scores(parts)
    want = [np.mean([adjusted_rand_score(parts[i], parts[j]) for j in range(5) if j != i]) for i in range(5)]
    assert scores == pytest.approx(want)
    assert consensus_scores(parts[:1]) == [1.0]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="numba widens the pool to every core: needs two")
def test_umap_leaves_torchs_thread_count_alone():
    """In a fresh process (numba not started), a partition by UMAP keeps torch at one thread
    (before the fix: 2 after UMAP of 400 points in 200 dimensions, on two cores)."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from pyro_gmvae.partition import partition_latents\n"
        "partition_latents(torch.randn(400, 200), 3, seed=0, method='umap')\n"
        "print(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "PASSIVE"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"


def test_one_restart_runs_no_probe(tmp_path, monkeypatch):
    import pyro_gmvae.initialization as initialization

    monkeypatch.setattr(initialization, "probe_start", lambda *a, **k: pytest.fail("probe with one start"))
    train(Config(out=str(tmp_path / "r"), epochs=1, init="vae-kmeans", pretrain_epochs=1, **SMALL), make_figures=False)
    assert "restarts" not in json.loads((tmp_path / "r" / "init.json").read_text())


def test_a_diverged_probe_scores_inf():
    torch.manual_seed(3)
    model, guide = _model_and_guide()
    y, _ = _blobs()
    seat_components(model, guide, y, seed=0)
    y[::7] = float("nan")
    score = probe_start(model, guide, y, epochs=1, batch_size=50, lr=1e-3, num_particles=1, generator=torch.Generator())
    assert score["loss"] == float("inf")


def test_diverged_starts_are_never_kept(tmp_path, monkeypatch):
    import pyro_gmvae.initialization as initialization

    inf = float("inf")
    scores = iter([inf, 2.0, inf])
    monkeypatch.setattr(initialization, "probe_start", lambda *a, **k: {"loss": next(scores), "cluster_entropy": 0.5})
    config = dict(epochs=1, init="vae-kmeans", pretrain_epochs=1, init_restarts=3, **SMALL)
    train(Config(out=str(tmp_path / "r"), **config), make_figures=False)
    record = json.loads((tmp_path / "r" / "init.json").read_text())
    assert record["chosen"] == 1 and [r["probe_loss"] for r in record["restarts"]] == [None, 2.0, None]

    monkeypatch.setattr(initialization, "probe_start", lambda *a, **k: {"loss": inf, "cluster_entropy": float("nan")})
    with pytest.raises(NonFiniteLossError, match="all 3 starts diverged"):
        train(Config(out=str(tmp_path / "all"), **config), make_figures=False)


def test_a_presets_restarts_and_fit_go_with_its_init(monkeypatch):
    from pyro_gmvae import config as config_module

    preset = {**config_module.DATA_PRESETS["mnist"], "init": "vae-kmeans", "init_restarts": 4}
    monkeypatch.setitem(config_module.DATA_PRESETS, "mnist", preset)
    assert Config(data="mnist").resolved().init_restarts == 4
    assert Config(data="mnist").resolved().init_fit_epochs == 3
    random = Config(data="mnist", init="random").resolved()  # no error: nothing to restart or fit
    assert random.init_restarts == 1 and random.init_fit_epochs == 0
    assert Config(data="mnist", init="random", init_restarts=3).resolved().init_restarts == 3  # refused by train
    assert Config(data="spiral", init="vae-kmeans").resolved().init_restarts == 1


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of pairs of examples on which two partitions agree (same or different cluster)."""
    same_a, same_b = a[:, None] == a[None, :], b[:, None] == b[None, :]
    return (same_a == same_b).float().mean().item()


def test_umap_partition_follows_curved_clusters_that_kmeans_cuts():
    from sklearn.datasets import make_moons

    points, moon = make_moons(400, noise=0.04, random_state=0)
    loc = torch.as_tensor(np.hstack([points, np.zeros((400, 2))]), dtype=torch.float32)  # a 4-D latent
    moon = torch.as_tensor(moon)
    kmeans = partition_latents(loc, 2, seed=0, method="kmeans")
    umap = partition_latents(loc, 2, seed=0, method="umap")
    assert _agreement(kmeans["labels"], moon) < 0.8  # k-means cuts both moons across
    assert _agreement(umap["labels"], moon) > 0.99
    again = partition_latents(loc, 2, seed=0, method="umap")
    assert torch.equal(again["labels"], umap["labels"]) and again["inertia"] == umap["inertia"]


def test_partition_refuses_too_few_examples_and_unknown_methods():
    with pytest.raises(UserInputError, match="at least K=3"):
        partition_latents(torch.randn(2, 4), 3, seed=0)
    with pytest.raises(UserInputError, match="more than 11"):
        partition_latents(torch.randn(8, 4), 3, seed=0, method="umap")
    with pytest.raises(ValueError, match="unknown partition"):
        partition_latents(torch.randn(20, 4), 3, seed=0, method="dbscan")


@pytest.mark.parametrize("guide_name", ["v2", "v1"])
def test_fit_teaches_the_cluster_posterior_a_partition(guide_name):
    torch.manual_seed(0)
    config = Config(data="x.npz", K=3, x_dim=4, w_dim=3, hidden_dim=16, guide=guide_name).resolved()
    model, guide = build_model_and_guide(config, (6,))
    y, blob = _blobs()
    target = (blob + 1) % 3  # any relabelling of the blobs: the fit must learn this one
    guide.eval()
    before = (guide.cluster_log_probs(model, guide.encode(y)).argmax(-1) == target).float().mean()
    record = fit_to_partition(
        model,
        guide,
        y,
        target,
        epochs=8,
        batch_size=50,
        lr=1e-2,
        weight=10.0,
        num_particles=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(record["loss"]) == len(record["cross_entropy"]) == 8
    assert record["cross_entropy"][-1] < 0.1 * record["cross_entropy"][0]
    guide.eval()
    model.eval()
    after = (guide.cluster_log_probs(model, guide.encode(y)).argmax(-1) == target).float().mean()
    assert before < 0.7 and after > 0.98
    # A batch larger than the partitioned set (--batch-size above 20,000) is one full batch.
    record = fit_to_partition(
        model,
        guide,
        y[:40],
        target[:40],
        epochs=1,
        batch_size=500,
        lr=1e-3,
        weight=1.0,
        num_particles=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(record["loss"]) == 1 and all(map(math.isfinite, record["loss"]))


def test_umap_init_fits_records_and_repeats_exactly(tmp_path):
    config = dict(epochs=1, init="vae-umap", pretrain_epochs=1, init_fit_epochs=2, **SMALL)
    one = train(Config(out=str(tmp_path / "one"), **config), make_figures=False)
    record = json.loads((tmp_path / "one" / "init.json").read_text())
    assert record["init"] == "vae-umap" and record["fit_epochs"] == 2 and record["fit_weight"] == 10.0
    assert len(record["fit"]["loss"]) == len(record["fit"]["cross_entropy"]) == 2
    assert record["fit"]["cross_entropy"][1] < record["fit"]["cross_entropy"][0]
    two = train(Config(out=str(tmp_path / "two"), **config), make_figures=False)
    assert json.loads((tmp_path / "two" / "init.json").read_text())["test_at_init"] == record["test_at_init"]
    for a, b in zip(one.guide.state_dict().values(), two.guide.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_no_fit_by_default_and_none_without_a_partition(tmp_path):
    assert Config(data="spiral", init="vae-kmeans").resolved().init_fit_epochs == 0
    assert Config(data="mnist", init="random").resolved().init_fit_epochs == 0
    with pytest.raises(UserInputError, match="--init-fit-epochs needs --init vae-kmeans or vae-umap"):
        train(Config(out=str(tmp_path / "r"), epochs=1, init_fit_epochs=2, **SMALL), make_figures=False)
    with pytest.raises(UserInputError, match="--init-fit-epochs must be an integer >= 0"):
        train(Config(out=str(tmp_path / "r"), epochs=1, init="vae-kmeans", init_fit_epochs=-1, **SMALL))
    with pytest.raises(UserInputError, match="--init-fit-weight must be a finite number >= 0"):
        train(Config(out=str(tmp_path / "r"), epochs=1, init="vae-kmeans", init_fit_weight=-1.0, **SMALL))


def test_adam_kernel_reaches_every_optimiser_of_the_start(tmp_path, monkeypatch):
    """--adam-kernel fused: pretraining, the fit, the probes and the GMVAE phase all get it."""
    import pyro_gmvae.initialization as initialization
    import pyro_gmvae.training as training
    from pyro_gmvae.loop import adam

    kernels = []

    def recording_adam(params, lr, kernel="auto"):
        kernels.append(kernel)
        return adam(params, lr, kernel)

    monkeypatch.setattr(initialization, "adam", recording_adam)
    monkeypatch.setattr(training, "adam", recording_adam)
    config = Config(out=str(tmp_path / "r"), epochs=1, init="vae-kmeans", pretrain_epochs=1, init_fit_epochs=1,
                    init_restarts=2, init_select="probe", adam_kernel="fused", **SMALL)  # fmt: skip
    train(config, make_figures=False)
    # two starts: pretraining, fit and probe each, then the GMVAE phase
    assert kernels == ["fused"] * 7
