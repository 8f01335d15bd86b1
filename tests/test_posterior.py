"""Loading a run folder and querying it: load_run, the Run queries, posterior draws, ArviZ."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch
import torch.serialization
from conftest import requires_cuda

import pyro_gmvae
from pyro_gmvae import Config, Run, load_run, to_inference_data, train
from pyro_gmvae.checkpoint import CHECKPOINT_NAME, FORMAT, atomic_write_bytes, load_checkpoint, save_checkpoint
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.posterior import cluster_probs, posterior_draws

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(data="spiral", train_subset=600, test_subset=200, epochs=3, seed=1, progress=False)

# The README's "load a run and get cluster probabilities" example, verbatim.
README_SNIPPET = """\
import pyro_gmvae
pyro_gmvae.train(pyro_gmvae.Config(epochs=2, out="runs/demo", progress=False), overwrite=True)
run = pyro_gmvae.load_run("runs/demo", device="cpu")  # any run folder, e.g. from experiments/run.py
data = run.load_data()  # the run's own data set and splits
probs = run.cluster_probs(data.x_test)  # (N, K): p(z | x, w) at the posterior means
print(probs.shape, probs[0].round(decimals=2), run.assign(data.x_test[:10]))
"""


@pytest.fixture(scope="module", params=["v2", "v1"])
def trained(request, tmp_path_factory):
    """A short spiral run per guide: (Run, its test inputs)."""
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    result = train(Config(guide=request.param, out=str(out), **SMALL), overwrite=True, make_figures=False)
    return result


@pytest.fixture
def run(trained) -> Run:
    return load_run(trained.out)


def _x_test(run: Run) -> torch.Tensor:
    return run.load_data().x_test


# --- loading ------------------------------------------------------------------------------
def test_loaded_run_gives_the_saved_runs_cluster_probs(trained, run):
    x = _x_test(run)
    expected = cluster_probs(trained.model, trained.guide, x)
    assert torch.equal(run.cluster_probs(x), expected)
    assert torch.equal(run.assign(x), expected.argmax(-1))
    for name in ("model", "guide"):
        saved, loaded = getattr(trained, name).state_dict(), getattr(run, name).state_dict()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert not run.model.training and not run.guide.training
    assert run.config == trained.config
    assert run.history == trained.history
    assert run.final == json.loads(json.dumps(trained.final))
    assert run.data_shape == (2,) and run.num_clusters == trained.config.K
    # The run's metrics can be recomputed from the loaded model.
    assert (
        pyro_gmvae.clustering_metrics(run.cluster_probs(x), run.load_data().labels_test)["acc_hungarian"]
        == (trained.final["acc_hungarian"])
    )


def test_load_run_takes_the_checkpoint_file_too(trained, run):
    other = load_run(trained.out / CHECKPOINT_NAME)
    x = _x_test(run)
    assert other.path == run.path
    assert torch.equal(other.cluster_probs(x), run.cluster_probs(x))


def test_load_data_is_the_runs_data(trained, run):
    data = run.load_data()
    assert data.x.shape == (600, 2) and data.x_test.shape == (200, 2)
    assert run.load_data(subsets=False).x.shape[0] > 600


def _resave_as_if_on(device_string: str, source: Path, target: Path) -> None:
    """Rewrite a checkpoint so its storages say they live on ``device_string``.

    ``torch.save`` records each storage's location from ``location_tag``; on a GPU machine
    that is ``cuda:0``.  Without a GPU here, patching it writes exactly such a file.
    """
    state = torch.load(source, map_location="cpu", weights_only=True)
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: device_string
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
    finally:
        torch.serialization.location_tag = original
    target.mkdir()
    atomic_write_bytes(target / CHECKPOINT_NAME, buffer.getvalue())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine loads cuda:0 storages without mapping")
def test_run_saved_on_a_gpu_loads_on_cpu(trained, run, tmp_path):
    gpu_run = tmp_path / "gpu-run"
    _resave_as_if_on("cuda:0", trained.out / CHECKPOINT_NAME, gpu_run)
    # The file really is a "GPU" checkpoint: loading it unmapped fails on this machine.
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(gpu_run / CHECKPOINT_NAME, weights_only=True)
    loaded = load_run(gpu_run, device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    x = _x_test(run)
    assert torch.equal(loaded.cluster_probs(x), run.cluster_probs(x))


@requires_cuda
@pytest.mark.cuda
def test_cuda_round_trip(trained, run):
    x = _x_test(run)
    on_gpu = load_run(trained.out, device="cuda")
    assert all(p.device.type == "cuda" for p in on_gpu.guide.parameters())
    torch.testing.assert_close(on_gpu.cluster_probs(x), run.cluster_probs(x), atol=1e-5, rtol=1e-4)
    assert on_gpu.sample(0, 4).device.type == "cpu"


# --- incompatible or broken checkpoints -------------------------------------------------
def _rewrite(trained, tmp_path: Path, **changes) -> Path:
    state = load_checkpoint(trained.out / CHECKPOINT_NAME)
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    folder = tmp_path / "edited"
    folder.mkdir()
    save_checkpoint(folder / CHECKPOINT_NAME, {k: v for k, v in state.items() if k not in ("format", "version")})
    return folder


def test_mismatched_weights_are_a_clear_error(trained, tmp_path):
    config = {**trained.config.to_dict(), "K": trained.config.K + 3}
    with pytest.raises(UserInputError, match=r"do not fit the architecture.*size mismatch"):
        load_run(_rewrite(trained, tmp_path, config=config))


def test_unknown_config_is_a_clear_error(trained, tmp_path):
    config = {**trained.config.to_dict(), "option_from_the_future": 1}
    with pytest.raises(UserInputError, match="config this pyro_gmvae cannot build"):
        load_run(_rewrite(trained, tmp_path, config=config))
    folder = tmp_path / "edited"
    config = {**trained.config.to_dict(), "guide": "v9"}
    save_checkpoint(folder / CHECKPOINT_NAME, {**load_checkpoint(trained.out / CHECKPOINT_NAME), "config": config})
    with pytest.raises(UserInputError, match="unknown --guide 'v9'"):
        load_run(folder)


def test_missing_entries_are_a_clear_error(trained, tmp_path):
    with pytest.raises(UserInputError, match="lacks model"):
        load_run(_rewrite(trained, tmp_path, model=None))


def test_other_format_version_is_a_clear_error(trained, tmp_path):
    folder = tmp_path / "future"
    folder.mkdir()
    state = load_checkpoint(trained.out / CHECKPOINT_NAME)
    buffer = io.BytesIO()
    torch.save({**state, "format": FORMAT, "version": 99}, buffer)
    atomic_write_bytes(folder / CHECKPOINT_NAME, buffer.getvalue())
    with pytest.raises(UserInputError, match="format version 99"):
        load_run(folder)


def test_missing_or_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    with pytest.raises(UserInputError, match="no checkpoint"):
        load_run(tmp_path / "nothing-here")
    folder = tmp_path / "torn"
    folder.mkdir()
    data = (trained.out / CHECKPOINT_NAME).read_bytes()
    (folder / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="unreadable"):
        load_run(folder)
    with pytest.raises(UserInputError, match="unknown device"):
        load_run(trained.out, device="tpu")


# --- queries ------------------------------------------------------------------------------
def test_query_shapes(run):
    x = _x_test(run)
    num, num_clusters = len(x), run.num_clusters
    x_dim, w_dim = run.config.x_dim, run.config.w_dim
    probs = run.cluster_probs(x)
    assert probs.shape == (num, num_clusters)
    torch.testing.assert_close(probs.sum(-1), torch.ones(num))
    assert run.cluster_probs(x, num_samples=5).shape == (num, num_clusters)
    assert run.assign(x).shape == (num,) and run.assign(x).dtype == torch.int64
    q = run.encode(x)
    assert q["x_loc"].shape == q["x_scale"].shape == (num, x_dim)
    assert q["w_loc"].shape == q["w_scale"].shape == (num, w_dim)
    assert ("z_logits" in q) == (run.config.guide == "v1")
    assert run.reconstruct(x).shape == (num, 2)
    assert run.sample(0, 7).shape == (7, 2)
    assert run.sample(num_clusters - 1, 7, w="prior").shape == (7, 2)
    assert run.sample(1, 7, w=torch.ones(w_dim), mean=False).shape == (7, 2)
    with pytest.raises(ValueError, match="cluster must be in"):
        run.sample(num_clusters, 3)
    loc, scale = run.components()
    assert loc.shape == scale.shape == (num_clusters, x_dim) and bool((scale > 0).all())
    loc, scale = run.components(torch.zeros(4, w_dim))
    assert loc.shape == (4, num_clusters, x_dim)
    terms = run.elbo_terms(x)
    assert set(terms) == {"recon", "cond_prior", "w_prior", "z_prior", "cv", "elbo", "loss"}
    assert all(value.shape == (num,) for value in terms.values())
    # Numpy input works like a tensor, and batching does not change the answer.
    assert torch.equal(run.cluster_probs(x.numpy()), probs)
    torch.testing.assert_close(run.cluster_probs(x, batch_size=7), probs)


def test_queries_have_no_side_effects(run):
    x = _x_test(run)
    run.model.train()  # a notebook may have left it so; BatchNorm would then update its statistics
    run.guide.train()
    before = {name: t.clone() for name, t in {**run.model.state_dict(), **run.guide.state_dict()}.items()}
    run.model.eval()
    run.guide.eval()
    expected = run.cluster_probs(x)
    run.model.train()
    run.guide.train()
    outputs = [
        run.cluster_probs(x),
        run.cluster_probs(x, num_samples=3),
        run.assign(x),
        *run.encode(x).values(),
        run.reconstruct(x),
        run.sample(0, 3),
        *run.components(),
        *run.elbo_terms(x).values(),
        *run.posterior_draws(x[:5], num_samples=3).values(),
    ]
    assert torch.equal(outputs[0], expected)  # evaluated in eval mode whatever the incoming mode
    assert run.model.training and run.guide.training  # the caller's mode comes back
    after = {**run.model.state_dict(), **run.guide.state_dict()}
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(out.requires_grad for out in outputs)
    assert all(p.grad is None for p in [*run.model.parameters(), *run.guide.parameters()])


def test_sampled_cluster_probs_can_leave_the_global_rng_alone(run):
    x = _x_test(run)
    state = torch.get_rng_state()
    a = run.cluster_probs(x, num_samples=4, generator=torch.Generator().manual_seed(5))
    b = run.cluster_probs(x, num_samples=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)


# --- posterior draws and ArviZ ------------------------------------------------------------
def test_posterior_draws_follow_the_cluster_posterior(run):
    x = _x_test(run)[:20]
    num_samples = 2000
    draws = run.posterior_draws(x, num_samples=num_samples, batch_size=8)
    assert draws["z"].shape == (num_samples, 20) and draws["z"].dtype == torch.int64
    assert draws["x"].shape == (num_samples, 20, run.config.x_dim)
    assert draws["w"].shape == (num_samples, 20, run.config.w_dim)
    assert draws["cluster_probs"].shape == (num_samples, 20, run.num_clusters)
    # z ~ p(z | x_s, w_s): its frequencies match the mean of those probabilities.  Binomial
    # standard error <= 0.5 / sqrt(S) = 0.011; 5 of them bound all 20 * K cells.
    freq = torch.nn.functional.one_hot(draws["z"], run.num_clusters).float().mean(0)
    assert (freq - draws["cluster_probs"].mean(0)).abs().max() < 5 * 0.5 / num_samples**0.5
    # log_likelihood is log p(y | x) at each drawn x.
    with torch.no_grad():
        expected = run.model.p_y(draws["x"]).log_prob(x)
    torch.testing.assert_close(draws["log_likelihood"], expected)
    # The drawn (x, w) come from q: their means approach the guide's locations.
    q = run.encode(x)
    tolerance = 6 * float(q["x_scale"].max()) / num_samples**0.5
    torch.testing.assert_close(draws["x"].mean(0), q["x_loc"], atol=tolerance, rtol=0)


def test_inference_data_dims_coords_and_summary(run):
    x = _x_test(run)[:12]
    idata = to_inference_data(run, x, num_samples=40, example_ids=np.arange(100, 112))
    assert set(idata.groups()) == {"posterior", "log_likelihood", "observed_data"}
    post = idata.posterior
    assert post["w"].dims == ("chain", "draw", "example", "w_dim")
    assert post["x"].dims == ("chain", "draw", "example", "x_dim")
    assert post["z"].dims == ("chain", "draw", "example")
    assert post["cluster_probs"].dims == ("chain", "draw", "example", "cluster")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "example")
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == 40
    assert list(post["example"].values) == list(range(100, 112))
    assert list(post["cluster"].values) == list(range(run.num_clusters))
    assert list(post["x_dim"].values) == list(range(run.config.x_dim))
    assert list(post["w_dim"].values) == list(range(run.config.w_dim))
    np.testing.assert_allclose(post["cluster_probs"].sum("cluster"), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(idata.observed_data["y"].values, x.numpy())

    summary = az.summary(idata, var_names=["cluster_probs", "x", "w"], kind="stats")
    expected_rows = 12 * (run.num_clusters + run.config.x_dim + run.config.w_dim)
    assert summary.shape[0] == expected_rows
    assert "cluster_probs[100, 0]" in summary.index
    assert np.isfinite(summary["mean"].to_numpy()).all()
    # The full summary (with ESS; r_hat needs two chains and is NaN here) also runs.
    full = az.summary(idata, var_names=["z"])
    assert len(full) == 12 and (full["ess_bulk"] > 0).all()
    # ArviZ's model checks read the log_likelihood group (40 draws are few for PSIS: ignore its warning).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert np.isfinite(az.loo(idata, pointwise=False).elpd_loo)


def test_inference_data_from_a_model_guide_pair(trained):
    x = torch.randn(5, 2)
    idata = to_inference_data((trained.model, trained.guide), x, num_samples=4)
    assert idata.posterior["z"].shape == (1, 4, 5)
    with pytest.raises(TypeError, match="model, guide"):
        to_inference_data(object(), x)


def test_posterior_draws_validate_num_samples(trained):
    with pytest.raises(ValueError, match="num_samples"):
        posterior_draws(trained.model, trained.guide, torch.zeros(3, 2), num_samples=0)


# --- the README example -------------------------------------------------------------------
def test_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(README_SNIPPET, "README load_run example", "exec"), namespace)
    assert namespace["probs"].shape == (1000, 8)
    assert "torch.Size([1000, 8])" in capsys.readouterr().out
    assert len(README_SNIPPET.strip().splitlines()) == 6


def test_readme_carries_the_snippet():
    readme = (REPO / "README.md").read_text()
    if "load_run" not in readme:
        pytest.skip("the README section on loading runs has not been merged yet")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert any(block.startswith(README_SNIPPET) for block in blocks)  # the ArviZ lines may follow
