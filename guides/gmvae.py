"""Guides of the GMVAE: the v2 ("exact") and v1 ("cluster head") recognition networks."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_gmvae.networks import positive_scale
from pyro_gmvae.objective import Regularization, kl_categorical, z_prior_adjustment


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

    cluster_posterior = "exact"

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def encode(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Variational parameters for a batch: ``x_loc``, ``x_scale`` (B, Dx), ``w_*`` (B, Dw)."""
        return self.encoder(y)

    @staticmethod
    def posteriors(q: dict[str, torch.Tensor]) -> tuple[dist.TorchDistribution, dist.TorchDistribution]:
        """q(w | y) and q(x | y) from the output of :meth:`encode`, batch shape (B,)."""
        q_w = dist.Normal(q["w_loc"], q["w_scale"]).to_event(1)
        q_x = dist.Normal(q["x_loc"], q["x_scale"]).to_event(1)
        return q_w, q_x

    def q_w(self, y: torch.Tensor):
        return self.posteriors(self.encode(y))[0]

    def q_x(self, y: torch.Tensor):
        return self.posteriors(self.encode(y))[1]

    def forward(self, y: torch.Tensor) -> None:
        q_w, q_x = self.posteriors(self.encode(y))
        with pyro.plate("data", y.shape[0]):
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

    cluster_posterior = "guide"

    def __init__(self, encoder: Encoder, regularization: Regularization = Regularization(), cluster_log_weights=None):
        super().__init__(encoder)
        if encoder.z_logits is None:
            raise ValueError("ClusterHeadGuide needs an Encoder built with num_clusters")
        self.regularization = regularization
        # A plain callable, not a submodule: the prior's parameters belong to the model.
        self.cluster_log_weights = cluster_log_weights

    def q_z(self, y: torch.Tensor):
        return dist.Categorical(logits=self.encode(y)["z_logits"])

    def forward(self, y: torch.Tensor) -> None:
        q = self.encode(y)
        q_w, q_x = self.posteriors(q)
        reg = self.regularization
        with pyro.plate("data", y.shape[0]):
            pyro.sample("w", q_w)
            pyro.sample("z", dist.Categorical(logits=q["z_logits"]), infer={"enumerate": "parallel"})
            pyro.sample("x", q_x)
            if reg.touches_z_prior:
                if self.cluster_log_weights is None:
                    raise ValueError("ClusterHeadGuide with eta != 1 or free bits needs cluster_log_weights")
                log_q = torch.log_softmax(q["z_logits"], -1)
                z_prior = kl_categorical(log_q, self.cluster_log_weights())
                pyro.factor("z_prior_regularizer", -z_prior_adjustment(z_prior, reg), has_rsample=True)


GUIDES = {"v2": ExactGuide, "v1": ClusterHeadGuide}
