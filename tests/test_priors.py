"""The prior variants: what each one shares or learns."""

from __future__ import annotations

import torch

from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.objective import make_elbo
from pyro_gmvae.priors import PRIORS, TiedScalePrior


def test_tied_prior_shares_one_scale_the_geometric_mean_of_the_heads():
    prior = TiedScalePrior(num_clusters=4, x_dim=3, w_dim=2, hidden_dim=8)
    w = torch.randn(6, 2)
    loc, scale = prior.components(w)
    free_loc, free_scale = prior.network(w)
    assert torch.equal(loc, free_loc)
    assert scale.shape == (6, 4, 3)
    assert torch.allclose(scale, free_scale.log().mean(-2, keepdim=True).exp().expand_as(scale))
    assert torch.equal(scale[:, 0], scale[:, 3])


def test_every_prior_trains_a_step_through_the_enumerated_elbo():
    y = torch.randn(16, 2)
    for name in PRIORS:
        torch.manual_seed(0)
        model, guide = build_model_and_guide(Config(prior=name).resolved(), (2,))
        loss_fn = make_elbo()(model, guide)
        loss = loss_fn(y)
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in model.prior.network.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
