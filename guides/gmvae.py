"""Guides of the GMVAE: the v2 ("exact") and v1 ("cluster head") recognition networks.

Each guide owns its cluster posterior r(z), the distribution over clusters that the
ELBO's z terms, the assignments and the fit to a partition use:

- :meth:`ExactGuide.cluster_log_probs` gives r = p(z | x, w), the model's exact
  posterior (z is summed out in the model);
- :meth:`ClusterHeadGuide.cluster_log_probs` gives r = q(z | y) from its softmax head, and
  the guide issues the z-prior regulariser of that r itself.

Pairing goes through :meth:`ExactGuide.build` (the guide for a resolved config) and
``model_regularization`` (what the model applies to its exact posterior), so no code
outside this module branches on the kind of guide.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_gmvae.networks import positive_scale
from pyro_gmvae.objective import Regularization, kl_categorical, z_prior_adjustment
from pyro_gmvae.priors import MixturePrior


class Encoder(nn.Module):
    """Shared trunk plus linear heads for q(x|y), q(w|y) and, optionally, q(z|y) logits."""

    def __init__(self, trunk: nn.Module, x_dim: int, w_dim: int, num_clusters: int | None = None):
        super().__init__()
        self.trunk = trunk
        hidden = trunk.out_dim
        self.x_loc = nn.Linear(hidden, x_dim)
        self.x_scale = nn.Linear(hidden, x_dim)
        self.w_loc = nn.Linear(hidden, w_dim)
        self.w_scale = nn.Linear(hidden, w_dim)
        self.z_logits = nn.Linear(hidden, num_clusters) if num_clusters else None

    def forward(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(y)  # (B, H)
        out = {
            "x_loc": self.x_loc(h),  # (B, Dx)
            "x_scale": positive_scale(self.x_scale(h)),
            "w_loc": self.w_loc(h),  # (B, Dw)
            "w_scale": positive_scale(self.w_scale(h)),
        }
        if self.z_logits is not None:
            out["z_logits"] = self.z_logits(h)  # (B, K)
        return out


class ExactGuide(PyroModule):
    """v2 guide (paper version 2): z is summed out exactly in the model.

    Process, per example in the ``"data"`` plate::

        w ~ q(w | y) = N(loc_w(y), diag scale_w(y)^2)        "w"
        x ~ q(x | y) = N(loc_x(y), diag scale_x(y)^2)        "x"
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    @classmethod
    def build(cls, trunk: nn.Module, config, prior: MixturePrior, regularization: Regularization) -> ExactGuide:
        """The guide for a resolved config, on ``trunk`` (the prior and weights are unused here)."""
        return cls(Encoder(trunk, config.x_dim, config.w_dim))

    @staticmethod
    def model_regularization(regularization: Regularization) -> Regularization:
        """What the paired model applies to p(z | x, w): all of it, since r = p(z | x, w) here."""
        return regularization

    def cluster_log_probs(self, model, q: dict[str, torch.Tensor], x=None, w=None) -> torch.Tensor:
        """log r(z) = log p(z | x, w), the model's exact posterior, shape x.shape[:-1] + (K,).

        ``q`` is the output of :meth:`encode`; ``x`` (..., B, Dx) and ``w`` (..., B, Dw)
        default to the posterior means ``q["x_loc"]`` and ``q["w_loc"]``.
        """
        return model.cluster_log_posterior(q["x_loc"] if x is None else x, q["w_loc"] if w is None else w)

    def regularizer(self, q: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """Value of the guide's own regulariser factor: none here (the model carries r's terms)."""
        return 0.0

    def encode(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Variational parameters for a batch: ``x_loc``, ``x_scale`` (B, Dx), ``w_*`` (B, Dw)."""
        return self.encoder(y)

    @staticmethod
    def posteriors(q: dict[str, torch.Tensor]) -> tuple[dist.TorchDistribution, dist.TorchDistribution]:
        """q(w | y) and q(x | y) from the output of :meth:`encode`, batch shape (B,)."""
        q_w = dist.Normal(q["w_loc"], q["w_scale"]).to_event(1)
        q_x = dist.Normal(q["x_loc"], q["x_scale"]).to_event(1)
        return q_w, q_x

    def forward(self, y: torch.Tensor, kl_weight: float = 1.0, labels: torch.Tensor | None = None) -> None:
        """Issue the sites for ``y``; ``kl_weight`` and ``labels`` are the model's (the signatures match)."""
        q_w, q_x = self.posteriors(self.encode(y))
        size = int(y.shape[0])  # Python ints: see GMVAE.forward
        with pyro.plate("data", size, subsample_size=size):
            pyro.sample("w", q_w)
            pyro.sample("x", q_x)


class ClusterHeadGuide(ExactGuide):
    """v1 guide (paper version 1): a softmax cluster head q(z|y) on the same trunk.

    Process, per example in the ``"data"`` plate::

        w ~ q(w | y)                                         "w"
        z ~ q(z | y) = Categorical(softmax(logits(y)))       "z"  enumerated in parallel
        x ~ q(x | y)                                         "x"

    With eta != 1 or free bits, the guide also carries the z_prior adjustment as a
    ``pyro.factor`` (negated: guide log-densities enter the ELBO with a minus sign), since
    r = q(z|y) lives here.  ``cluster_log_weights`` is the prior's log pi, given by the
    code that pairs model and guide.
    """

    def __init__(self, encoder: Encoder, regularization: Regularization = Regularization(), cluster_log_weights=None):
        super().__init__(encoder)
        if encoder.z_logits is None:
            raise ValueError("ClusterHeadGuide needs an Encoder built with num_clusters")
        self.regularization = regularization
        # A plain callable, not a submodule: the prior's parameters belong to the model.
        self.cluster_log_weights = cluster_log_weights

    @classmethod
    def build(cls, trunk: nn.Module, config, prior: MixturePrior, regularization: Regularization):
        """The guide for a resolved config: a K-way head on ``trunk``, scoring r against ``prior``'s pi."""
        encoder = Encoder(trunk, config.x_dim, config.w_dim, config.K)
        return cls(encoder, regularization, cluster_log_weights=prior.cluster_log_weights)

    @staticmethod
    def model_regularization(regularization: Regularization) -> Regularization:
        """What the paired model applies to p(z | x, w): alpha and gamma; eta and free bits act on r = q(z|y) here."""
        return Regularization(
            cv_weight=regularization.cv_weight,
            balance_weight=regularization.balance_weight,
            balance_tolerance=regularization.balance_tolerance,
        )

    def cluster_log_probs(self, model, q: dict[str, torch.Tensor], x=None, w=None) -> torch.Tensor:
        """log r(z) = log q(z | y), shape (B, K); it depends on neither ``x`` nor ``w``."""
        return torch.log_softmax(q["z_logits"], -1)

    def regularizer(self, q: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """Value of the ``"z_prior_regularizer"`` factor, shape (B,): ``-(eta - 1) z_prior`` of q(z|y)
        (with free bits), negated as it enters through the guide."""
        reg = self.regularization
        if not reg.touches_z_prior:
            return 0.0
        if self.cluster_log_weights is None:
            raise ValueError("ClusterHeadGuide with eta != 1 or free bits needs cluster_log_weights")
        z_prior = kl_categorical(torch.log_softmax(q["z_logits"], -1), self.cluster_log_weights())
        return -z_prior_adjustment(z_prior, reg)

    def forward(self, y: torch.Tensor, kl_weight: float = 1.0, labels: torch.Tensor | None = None) -> None:
        """Issue the sites for ``y``.  With ``labels`` z is observed in the model, so the
        guide issues no z site and no z-prior regulariser (the classifier term on q(z|y) is
        added by :mod:`pyro_gmvae.semisupervised`)."""
        q = self.encode(y)
        q_w, q_x = self.posteriors(q)
        size = int(y.shape[0])  # Python ints: see GMVAE.forward
        with pyro.plate("data", size, subsample_size=size):
            pyro.sample("w", q_w)
            if labels is None:
                pyro.sample("z", dist.Categorical(logits=q["z_logits"]), infer={"enumerate": "parallel"})
            pyro.sample("x", q_x)
            if self.regularization.touches_z_prior and labels is None:
                pyro.factor("z_prior_regularizer", self.regularizer(q), has_rsample=True)


GUIDES = {"v2": ExactGuide, "v1": ClusterHeadGuide}
