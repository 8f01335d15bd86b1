"""Held-out log-likelihood (pyro_gmvae.loglik): against the ELBO, in S, against quadrature, and its CLI.

Repeated estimates run as one call on the data tiled R times (each copy of an example gets
its own independent draws), so a test pays the per-call set-up once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from conftest import load_script
from torch import nn

from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.guides.gmvae import Encoder, ExactGuide
from pyro_gmvae.likelihoods import GaussianLikelihood
from pyro_gmvae.loglik import loglik, loglik_summary
from pyro_gmvae.models.gmvae import GMVAE
from pyro_gmvae.objective import elbo_terms
from pyro_gmvae.priors import MixturePrior

REPO = Path(__file__).resolve().parents[1]
EVALUATE = REPO / "experiments" / "evaluate.py"
RUN = REPO / "experiments" / "run.py"


def _tiny_model(data_shape=(4,), **options):
    config = Config(K=3, x_dim=2, w_dim=2, hidden_dim=16, cv_weight=0.0, **options).resolved()
    model, guide = build_model_and_guide(config, data_shape)
    return model.double(), guide.double()


def _train(model, guide, y, steps, lr=1e-2, params=None):
    """A few Adam steps on the negative ELBO (z summed exactly)."""
    params = list(model.parameters()) + list(guide.parameters()) if params is None else params
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    guide.train()
    for _ in range(steps):
        optimizer.zero_grad()
        (-elbo_terms(model, guide, y)["elbo"].mean()).backward()
        optimizer.step()
    model.eval()
    guide.eval()


def _repeated(model, guide, y, num_samples, repeats, seed):
    """(repeats, N) independent loglik estimates."""
    gen = torch.Generator().manual_seed(seed)
    tiled = y.repeat((repeats,) + (1,) * (y.dim() - 1))
    out = loglik((model, guide), tiled, num_samples=num_samples, generator=gen, progress=False)
    return out.reshape(repeats, len(y))


# --- the estimator -------------------------------------------------------------------------
def test_single_sample_matches_the_elbo_in_expectation(tiny_mixture):
    y = tiny_mixture[0][:20].double()
    model, guide = _tiny_model()
    repeats = 4000
    est = _repeated(model, guide, y, 1, repeats, seed=1)  # (R, N)
    model.eval()
    guide.eval()
    with torch.no_grad():
        elbo = elbo_terms(model, guide, y.repeat(repeats, 1), closed_form_w=False)["elbo"].reshape(repeats, -1)
    diff = est.mean(0) - elbo.mean(0)
    stderr = torch.sqrt(est.var(0) / repeats + elbo.var(0) / repeats)
    assert (diff.abs() < 4 * stderr).all(), diff / stderr
    # and pooled over examples, a sharper check of the same identity
    assert abs(diff.mean()) < 4 * stderr.pow(2).sum().sqrt() / len(y)


def test_estimate_rises_with_the_number_of_samples(tiny_mixture):
    y = tiny_mixture[0].double()
    model, guide = _tiny_model()
    torch.manual_seed(0)
    _train(model, guide, y, steps=10)  # a little: the guide still leaves a gap for S to close
    repeats = 100
    means = {s: _repeated(model, guide, y, s, repeats, seed=s).mean(0) for s in (1, 10, 100)}  # (N,) each
    for low, high in ((1, 10), (10, 100)):
        gain = means[high] - means[low]  # paired per example
        assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain)), (low, high, gain.mean(), gain.std())
    assert model.training is False and guide.training is False


def test_modes_and_shapes_and_bad_input(tiny_mixture):
    y = tiny_mixture[0][:7]
    model, guide = _tiny_model()
    model.float()
    guide.float()
    model.train()
    guide.eval()
    out, mc = loglik((model, guide), y, num_samples=3, batch_size=2, memory_budget=1, progress=False,
                     return_mc_stderr=True)  # fmt: skip
    assert out.shape == (7,) and mc.shape == (7,) and torch.isfinite(out).all() and torch.isfinite(mc).all()
    assert model.training is True and guide.training is False  # modes restored
    assert loglik((model, guide), y[:0], num_samples=2, progress=False).shape == (0,)
    summary = loglik_summary(out)
    assert summary["num_examples"] == 7
    assert summary["mean"] == pytest.approx(out.double().mean().item())
    assert summary["stderr"] == pytest.approx(out.double().std().item() / math.sqrt(7))
    with pytest.raises(UserInputError, match=">= 1"):
        loglik((model, guide), y, num_samples=0)
    with pytest.raises(UserInputError, match="shape"):
        loglik((model, guide), torch.zeros(3, 5), num_samples=2)
    with pytest.raises(TypeError):
        loglik(model, y, num_samples=2)


def test_v1_guide_ignores_its_cluster_head(tiny_mixture):
    """The v1 guide's q(z|y) plays no part: z is summed exactly, so its logits change nothing."""
    y = tiny_mixture[0][:10].double()
    model, guide = _tiny_model(guide="v1")
    first = loglik((model, guide), y, num_samples=20, generator=torch.Generator().manual_seed(0), progress=False)
    with torch.no_grad():
        guide.encoder.z_logits.weight.normal_()
    second = loglik((model, guide), y, num_samples=20, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.isfinite(first).all() and torch.equal(first, second)


def test_same_generator_same_answer_and_chunking_is_unbiased(tiny_mixture):
    y = tiny_mixture[0][:10].double()
    model, guide = _tiny_model()
    a = loglik((model, guide), y, num_samples=50, generator=torch.Generator().manual_seed(3), progress=False)
    b = loglik((model, guide), y, num_samples=50, generator=torch.Generator().manual_seed(3), progress=False)
    assert torch.equal(a, b)
    # One draw per chunk, one example per batch: the same estimator, so close at S = 300.
    gen = torch.Generator().manual_seed(4)
    big = loglik((model, guide), y, num_samples=300, generator=gen, progress=False)
    small = loglik((model, guide), y, num_samples=300, batch_size=1, memory_budget=1, generator=gen, progress=False)
    _, mc = loglik((model, guide), y, num_samples=300, generator=gen, progress=False, return_mc_stderr=True)
    assert ((big - small).abs() < 5 * math.sqrt(2) * mc).all()


# --- against the truth by quadrature ---------------------------------------------------------
class LinearGaussianDecoder(nn.Module):
    """x (..., 1) -> loc = a x + b and a constant raw scale, as (..., 2, D)."""

    def __init__(self, a, b, raw_scale):
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a, dtype=torch.float64))  # (D,)
        self.b = nn.Parameter(torch.as_tensor(b, dtype=torch.float64))
        self.raw_scale = nn.Parameter(torch.as_tensor(raw_scale, dtype=torch.float64))

    def forward(self, x):
        loc = x * self.a + self.b  # (..., D)
        return torch.stack([loc, self.raw_scale.expand_as(loc)], -2)


class SmallTrunk(nn.Module):
    def __init__(self, in_dim, out_dim=32):
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.Tanh(), nn.Linear(out_dim, out_dim), nn.Tanh())

    def forward(self, y):
        return self.net(y)


def _quadrature_model():
    torch.manual_seed(0)
    prior = MixturePrior(num_clusters=3, x_dim=1, w_dim=1, hidden_dim=8)
    with torch.no_grad():  # spread the components so p(y) is clearly multimodal
        prior.network.hidden[0].weight.mul_(2.0)
        prior.network.loc_head.weight.mul_(3.0)
        prior.network.loc_head.bias.copy_(torch.tensor([-2.0, 0.0, 2.0]))
    likelihood = GaussianLikelihood()
    decoder = LinearGaussianDecoder([1.0, -0.5], [0.2, 0.1], [-1.0, -0.5])
    model = GMVAE(prior, likelihood, decoder, (2,)).double()
    guide = ExactGuide(Encoder(SmallTrunk(2), 1, 1)).double()
    return model, guide


def _sample_data(model, n, gen):
    with torch.no_grad():
        w = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        z = torch.multinomial(model.prior.cluster_log_weights().exp(), n, replacement=True, generator=gen)
        loc, scale = model.prior.components(w)  # (n, K, 1)
        x = loc[torch.arange(n), z] + scale[torch.arange(n), z] * torch.randn(n, 1, generator=gen, dtype=torch.float64)
        p_y = model.p_y(x)
        return p_y.base_dist.loc + p_y.base_dist.scale * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def _trapezoid_log_weights(grid):
    step = grid[1] - grid[0]
    weights = torch.full_like(grid, step)
    weights[0] = weights[-1] = step / 2
    return weights.log()


def _truth_analytic_x(model, y, num=20001, bound=10.0):
    """log p(y): x integrated in closed form (linear-Gaussian decoder), w by the trapezoid rule."""
    with torch.no_grad():
        w = torch.linspace(-bound, bound, num, dtype=torch.float64)  # (G,)
        loc, scale = model.prior.components(w[:, None])  # (G, K, 1)
        dec = model.decoder
        noise = torch.nn.functional.softplus(dec.raw_scale) + 1e-3  # positive_scale of the likelihood
        mean = loc * dec.a + dec.b  # (G, K, D)
        cov = scale[..., None] ** 2 * torch.outer(dec.a, dec.a) + torch.diag(noise**2)  # (G, K, D, D)
        marginal = dist.MultivariateNormal(mean, covariance_matrix=cov)
        log_f = marginal.log_prob(y[:, None, None, :])  # (N, G, K)
        log_f = torch.logsumexp(log_f + model.prior.cluster_log_weights(), -1)  # z summed
        log_f = log_f + dist.Normal(0.0, 1.0).log_prob(w) + _trapezoid_log_weights(w)
        return torch.logsumexp(log_f, -1)  # (N,)


def _truth_brute_force(model, y, num=1201, bound=8.0):
    """log p(y) by a 2-D trapezoid grid over (x, w), z summed: no use of the decoder's linearity."""
    with torch.no_grad():
        w = torch.linspace(-bound, bound, num, dtype=torch.float64)
        loc, scale = model.prior.components(w[:, None])  # (Gw, K, 1)
        x_bound = (loc.abs() + 8 * scale).max().item()
        x = torch.linspace(-x_bound, x_bound, 4 * num, dtype=torch.float64)  # (Gx,)
        log_mix = dist.Normal(loc[None, :, :, 0], scale[None, :, :, 0]).log_prob(x[:, None, None])  # (Gx, Gw, K)
        log_mix = torch.logsumexp(log_mix + model.prior.cluster_log_weights(), -1)  # (Gx, Gw)
        log_prior = log_mix + dist.Normal(0.0, 1.0).log_prob(w) + _trapezoid_log_weights(w)
        log_prior = log_prior + _trapezoid_log_weights(x)[:, None]
        log_lik = model.p_y(x[:, None]).log_prob(y[:, None, :])  # (N, Gx)
        return torch.logsumexp(log_lik[:, :, None] + log_prior, (-2, -1))


def test_estimate_matches_quadrature_truth():
    model, guide = _quadrature_model()
    gen = torch.Generator().manual_seed(0)
    train_y = _sample_data(model, 300, gen)
    y = _sample_data(model, 8, gen)
    # Fit only the guide, a little: a proposal of the right size, the model left as it is.
    torch.manual_seed(0)
    _train(model, guide, train_y, steps=300, params=list(guide.parameters()))

    truth = _truth_analytic_x(model, y)
    assert torch.allclose(truth, _truth_brute_force(model, y), atol=1e-4), "the two quadratures disagree"

    repeats, num_samples = 10, 5000
    est = _repeated(model, guide, y, num_samples, repeats, seed=1)  # (R, N), independent
    sd = est.std(0)  # the Monte Carlo error of one S = 5000 estimate, measured honestly
    assert (sd < 0.1).all(), f"the proposal is too poor for a sharp test: {sd}"
    assert ((est[0] - truth).abs() < 3 * sd).all(), (est[0] - truth) / sd
    # The mean of R estimates: error sd / sqrt(R), plus the estimator's downward bias ~ sd^2 / 2.
    assert ((est.mean(0) - truth).abs() < 4 * sd / math.sqrt(repeats) + sd**2).all()
    # Not vacuous: the S = 1 bound (the ELBO) misses by far more than the S = 5000 estimate does.
    gap = truth - _repeated(model, guide, y, 1, 500, seed=2).mean(0)
    assert (gap > 5 * sd).all(), (gap, sd)
    # The delta-method error reported alongside agrees with the measured spread (a diagnostic).
    _, mc = loglik((model, guide), y, num_samples=num_samples, generator=gen, progress=False, return_mc_stderr=True)
    assert ((mc / sd > 0.33) & (mc / sd < 3.0)).all(), mc / sd


# --- the CLI ----------------------------------------------------------------------------------
def _evaluate_module():
    return load_script("evaluate")


def _check_json(path: Path, num_samples: int, num_examples: int):
    result = json.loads(path.read_text())
    assert result["num_samples"] == num_samples and result["split"] == "test"
    assert result["num_examples"] == num_examples
    assert math.isfinite(result["loglik_mean"]) and result["loglik_stderr"] > 0
    assert math.isfinite(result["elbo_mean"]) and result["elbo_stderr"] > 0
    assert result["config"]["data"] == "spiral" and result["config"]["K"] is not None  # resolved
    assert "git_commit" in result
    return result


def _cli(*args, timeout=300):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_writes_json(tmp_path, capsys):
    from pyro_gmvae.training import train

    out = tmp_path / "run"
    config = Config(epochs=1, train_subset=400, test_subset=200, out=str(out), progress=False)
    train(config, make_figures=False)
    evaluate = _evaluate_module()
    code = evaluate.main([str(out), "--loglik", "5", "--subset", "50", "--json", str(tmp_path / "ll.json"),
                          "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "log-likelihood (S=5" in printed and "ELBO" in printed
    result = _check_json(tmp_path / "ll.json", 5, 50)
    assert result["loglik_mean"] > result["elbo_mean"] - 0.5  # an S = 5 bound sits near or above the ELBO
    assert evaluate.main([str(out), "--loglik", "0"]) == 2
    assert "--loglik must be >= 1" in capsys.readouterr().err


def test_cli_bad_run_folder_is_one_line(tmp_path):
    result = _cli(EVALUATE, tmp_path / "no-such-run", "--loglik", "5")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no-such-run" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_end_to_end_on_a_trained_run(tmp_path):
    out = tmp_path / "run"
    trained = _cli(RUN, "--epochs", "1", "--train-subset", "400", "--test-subset", "200", "--out", out, "--no-progress")
    assert trained.returncode == 0, trained.stderr
    result = _cli(EVALUATE, out, "--loglik", "20", "--json", tmp_path / "ll.json", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "log-likelihood (S=20, 200 examples)" in result.stdout
    _check_json(tmp_path / "ll.json", 20, 200)
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in ([empty, "--loglik", "5"], [out, "--loglik", "0"], [out, "--loglik", "5", "--split", "val"]):
        failed = _cli(EVALUATE, *bad)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), failed.stderr
