"""The model and guides: every registered combination trains, users can swap in their own
prior and likelihood without touching ``models/``, and shapes hold under enumeration."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from pyro_gmvae import cluster_probs
from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.guides import GUIDES, ClusterHeadGuide, Encoder, ExactGuide
from pyro_gmvae.likelihoods import LIKELIHOODS, Likelihood
from pyro_gmvae.models import GMVAE
from pyro_gmvae.networks import TRUNKS, FCDecoder, FCTrunk, positive_scale
from pyro_gmvae.objective import Regularization, elbo_terms, make_elbo
from pyro_gmvae.priors import PRIORS, MixturePrior

K, X_DIM, W_DIM, HIDDEN = 3, 2, 2, 8
DATA_SHAPES = {"fc": (4,), "conv": (1, 28, 28)}


def test_registries_are_covered():
    assert set(DATA_SHAPES) == set(TRUNKS)
    assert set(LIKELIHOODS) >= {"bernoulli", "gaussian"}
    assert set(PRIORS) >= {"uniform", "learned"}
    assert set(GUIDES) == {"v1", "v2"}


def _data(network: str, likelihood: str, tiny_mixture, batch: int = 6) -> torch.Tensor:
    if network == "fc":
        y = tiny_mixture[0][:batch]
    else:
        y = torch.randn((batch,) + DATA_SHAPES[network], generator=torch.Generator().manual_seed(1))
    if LIKELIHOODS[likelihood].data_range == (0.0, 1.0):
        y = torch.sigmoid(y)  # grey levels
    return y


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("reg", [{}, dict(z_prior_weight=1.5, cv_weight=0.5, free_bits=0.01)], ids=["plain", "reg"])
@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("guide_name", sorted(GUIDES))
@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("network", sorted(TRUNKS))
def test_every_combination_trains_a_step(tiny_mixture, network, likelihood, guide_name, prior, reg):
    assert pyro.infer.util.is_validation_enabled()
    config = Config(
        data="spiral",
        network=network,
        likelihood=likelihood,
        guide=guide_name,
        prior=prior,
        K=K,
        x_dim=X_DIM,
        w_dim=W_DIM,
        hidden_dim=HIDDEN,
        mc_samples=2,
        **reg,
    ).resolved()
    y = _data(network, likelihood, tiny_mixture)
    model, guide = build_model_and_guide(config, y.shape[1:])
    loss_fn = make_elbo(config.mc_samples)(model, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in loss_fn.parameters()]

    loss = loss_fn(y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    for p in loss_fn.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    changed = [not torch.equal(b, p) for b, p in zip(before, loss_fn.parameters(), strict=True)]
    assert all(changed)  # every parameter is reached by the gradient
    terms = elbo_terms(model, guide, y, num_particles=2)
    assert all(torch.isfinite(v).all() and v.shape == (len(y),) for v in terms.values())
    probs = cluster_probs(model, guide, y)
    assert probs.shape == (len(y), K)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(y)))


# --- a user's own prior and likelihood, defined here, not in models/ -----------------
class LaplaceLikelihood(Likelihood):
    """Laplace observations with a location and a per-dimension scale from the decoder."""

    num_params = 2

    def forward(self, decoder_out, data_dims):
        loc = decoder_out.select(-data_dims - 1, 0)
        scale = positive_scale(decoder_out.select(-data_dims - 1, 1))
        return dist.Laplace(loc, scale).to_event(data_dims)


class StudentTPrior(MixturePrior):
    """Heavy-tailed p(w) = Student-t(4) and learned cluster weights that start non-uniform."""

    def __init__(self, num_clusters, x_dim, w_dim, hidden_dim, df: float = 4.0):
        super().__init__(num_clusters, x_dim, w_dim, hidden_dim)
        self.df = df
        self.logits = nn.Parameter(torch.linspace(1.0, -1.0, num_clusters))

    @property
    def cluster_logits(self):
        return self.logits

    def p_w(self, batch_size):
        zero = self.logits.new_zeros(batch_size, self.w_dim)
        return dist.StudentT(self.df, zero, 1.0).to_event(1)


def _custom_model(guide_name: str, data_dim: int = 4, reg: Regularization = Regularization(cv_weight=0.5)):
    prior = StudentTPrior(K, X_DIM, W_DIM, HIDDEN)
    likelihood = LaplaceLikelihood()
    decoder = FCDecoder(X_DIM, HIDDEN, (data_dim,), likelihood.num_params)
    if guide_name == "v1":
        encoder = Encoder(FCTrunk((data_dim,), HIDDEN), X_DIM, W_DIM, K)
        guide = ClusterHeadGuide(encoder, reg, cluster_log_weights=prior.cluster_log_weights)
    else:
        guide = ExactGuide(Encoder(FCTrunk((data_dim,), HIDDEN), X_DIM, W_DIM))
    model = GMVAE(prior, likelihood, decoder, (data_dim,), type(guide).model_regularization(reg))
    return model, guide


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("guide_name", ["v2", "v1"])
def test_custom_prior_and_likelihood_train(tiny_mixture, guide_name):
    y = tiny_mixture[0]
    model, guide = _custom_model(guide_name, reg=Regularization(z_prior_weight=1.2, cv_weight=0.5))
    loss_fn = make_elbo(2)(model, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    initial_logits = model.prior.logits.detach().clone()
    losses = []
    for _ in range(60):
        loss = loss_fn(y) / len(y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1, losses
    assert not torch.equal(model.prior.logits, initial_logits)  # pi is learned
    # The model really uses the user's pieces.
    trace = poutine.trace(poutine.enum(model, first_available_dim=-2)).get_trace(y)
    assert isinstance(trace.nodes["y"]["fn"].base_dist, dist.Laplace)
    assert isinstance(trace.nodes["w"]["fn"].base_dist, dist.StudentT)


@pytest.mark.parametrize("guide_name", ["v2", "v1"])
def test_custom_model_terms_match_traceenum(tiny_mixture, guide_name):
    """elbo_terms knows nothing of Laplace or Student-t, yet sums to the TraceEnum loss."""
    model, guide = _custom_model(guide_name, reg=Regularization(z_prior_weight=1.3, cv_weight=0.2))
    model.double()
    guide.double()
    y = tiny_mixture[0][:8].double()
    pyro.set_rng_seed(3)
    loss = make_elbo(3)(model, guide)(y)
    pyro.set_rng_seed(3)
    terms = elbo_terms(model, guide, y, num_particles=3, closed_form_w=False)
    torch.testing.assert_close(terms["loss"].sum(), loss, rtol=1e-10, atol=1e-10)


def test_custom_prior_w_term_is_its_own_kl(tiny_mixture):
    """The reported w_prior must be KL(q(w|y) || p(w)) for the prior actually used, not the
    N(0, I) formula: compare with a Monte Carlo estimate (S = 20000 draws per example,
    tolerance 4 combined standard errors)."""
    model, guide = _custom_model("v2")
    y = tiny_mixture[0][:8]
    num_samples = 20000
    with torch.no_grad():
        reported = elbo_terms(model, guide, y, num_particles=num_samples)["w_prior"]
        q_w, _ = guide.posteriors(guide.encode(y))
        w = q_w.sample((num_samples,))
        estimate = q_w.log_prob(w) - model.prior.p_w(len(y)).log_prob(w)  # (S, B)
    standard_error = estimate.std(0) / math.sqrt(num_samples)
    assert ((reported - estimate.mean(0)).abs() < 4 * math.sqrt(2) * standard_error).all()


# --- shapes under enumeration -----------------------------------------------------------
def test_p_x_broadcasts_over_enumerated_clusters():
    config = Config(data="spiral", K=K, x_dim=X_DIM, w_dim=W_DIM, hidden_dim=HIDDEN).resolved()
    model, _ = build_model_and_guide(config, (4,))
    w = torch.randn(5, 6, W_DIM)  # (M, B, Dw)
    z = torch.arange(K).reshape(K, 1, 1)  # as parallel enumeration lays it out
    p_x = model.p_x(w, z)
    assert p_x.batch_shape == (K, 5, 6)
    assert p_x.event_shape == (X_DIM,)
    loc, scale = model.prior.components(w)
    x = torch.randn(5, 6, X_DIM)
    # component k of example (m, b) is Normal(loc[m, b, k], scale[m, b, k])
    expected = torch.distributions.Normal(loc.permute(2, 0, 1, 3), scale.permute(2, 0, 1, 3)).log_prob(x).sum(-1)
    torch.testing.assert_close(p_x.log_prob(x), expected)
    # a plain z per example picks one component each
    z_each = torch.tensor([0, 1, 2, 0, 1, 2])
    assert model.p_x(w, z_each).batch_shape == (5, 6)


@pytest.mark.parametrize("guide_name", ["v2", "v1"])
def test_site_shapes_inside_traceenum(tiny_mixture, guide_name):
    num_particles, batch = 4, 6
    config = Config(data="spiral", K=K, x_dim=X_DIM, w_dim=W_DIM, hidden_dim=HIDDEN, guide=guide_name).resolved()
    model, guide = build_model_and_guide(config, (4,))
    y = tiny_mixture[0][:batch]

    def particles(fn):
        def wrapped(y):
            with pyro.plate("num_particles_vectorized", num_particles, dim=-2):
                return fn(y)

        return wrapped

    guide_trace = poutine.trace(poutine.enum(particles(guide), first_available_dim=-3)).get_trace(y)
    model_trace = poutine.trace(
        poutine.enum(poutine.replay(particles(model), trace=guide_trace), first_available_dim=-3)
    ).get_trace(y)
    model_trace.compute_log_prob()
    z_site = model_trace.nodes["z"]
    assert z_site["value"].shape[-2:] == (1, 1) and z_site["value"].numel() == K
    assert model_trace.nodes["w"]["value"].shape == (num_particles, batch, W_DIM)
    x_site = model_trace.nodes["x"]
    assert x_site["value"].shape == (num_particles, batch, X_DIM)
    assert x_site["log_prob"].shape == (K, num_particles, batch)
    assert model_trace.nodes["y"]["log_prob"].shape == (num_particles, batch)
