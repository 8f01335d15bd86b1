"""Priors of the GMVAE: p(w), p(z) and the component generator p(x | z, w).

A prior module owns the prior network and the cluster weights.  The model asks it for
``p_w``, ``p_z`` and ``components(w)``; swap the prior by passing another instance (or a
subclass registered in :data:`PRIORS`).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyro_gmvae.densities import StandardNormal
from pyro_gmvae.networks import PriorNetwork


class MixturePrior(nn.Module):
    """The paper's prior: w ~ N(0, I), z ~ Categorical(1/K), x | z, w from the prior network.

    Parameters
    ----------
    num_clusters : int
        K, the number of mixture components.
    x_dim, w_dim, hidden_dim : int
        Sizes of x, w and the prior network's hidden layer.
    """

    def __init__(self, num_clusters: int, x_dim: int, w_dim: int, hidden_dim: int):
        super().__init__()
        self.num_clusters = num_clusters
        self.x_dim = x_dim
        self.w_dim = w_dim
        self.network = PriorNetwork(w_dim, hidden_dim, x_dim, num_clusters)
        # A buffer, so it follows .to(device) and dtype changes and lands in checkpoints.
        self.register_buffer("_fixed_logits", torch.zeros(num_clusters))

    @property
    def cluster_logits(self) -> torch.Tensor:
        """Unnormalised log pi, shape (K,)."""
        return self._fixed_logits

    def cluster_log_weights(self) -> torch.Tensor:
        """log pi, shape (K,)."""
        return torch.log_softmax(self.cluster_logits, -1)

    @torch.no_grad()
    def set_cluster_weights(self, weights: torch.Tensor) -> None:
        """Set pi to ``weights`` (K,), positive and summing to 1 (``--init-weights partition``).

        Writes log pi into the logits pi is read from: the fixed buffer here, the learned
        parameter in :class:`LearnedWeightsPrior` (where training then moves it).
        """
        weights = torch.as_tensor(weights, dtype=self.cluster_logits.dtype, device=self.cluster_logits.device)
        if weights.shape != (self.num_clusters,) or not bool((weights > 0).all()):
            raise ValueError(f"cluster weights must be {self.num_clusters} positive values; got {weights.tolist()}")
        self.cluster_logits.copy_((weights / weights.sum()).log())

    def p_w(self, batch_size: int) -> dist.TorchDistribution:
        """N(0, I) over w, batch shape (B,), event shape (Dw,).

        A :class:`~pyro_gmvae.densities.StandardNormal`: ``Normal(0, 1)`` with a shorter
        ``log_prob`` (the same numbers).
        """
        like = self.cluster_logits
        return StandardNormal((batch_size, self.w_dim), like.dtype, like.device).to_event(1)

    def p_z(self, batch_size: int) -> dist.TorchDistribution:
        """Categorical(pi), batch shape (B,)."""
        return dist.Categorical(logits=self.cluster_logits.expand(batch_size, self.num_clusters))

    def components(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Locations and scales of the K components of p(x | z, w), each (..., K, Dx)."""
        return self.network(w)


class LearnedWeightsPrior(MixturePrior):
    """As :class:`MixturePrior`, with the cluster weights pi learned by maximum likelihood."""

    def __init__(self, num_clusters: int, x_dim: int, w_dim: int, hidden_dim: int):
        super().__init__(num_clusters, x_dim, w_dim, hidden_dim)
        self.logits = nn.Parameter(torch.zeros(num_clusters))

    @property
    def cluster_logits(self) -> torch.Tensor:
        return self.logits


class TiedScalePrior(MixturePrior):
    """As :class:`MixturePrior`, with one scale per dimension shared by the K components.

    sigma(w) is the geometric mean over k of the prior network's K scale heads, so the
    components differ only in location: no component can widen and absorb its neighbours'
    tails, the drift ``experiments/drift_analysis.py`` shows on MNIST (the cluster of 0s
    taking 5s, 3s and 6s).  With a tied scale the boundaries between clusters are linear
    in x, as in linear discriminant analysis.
    """

    def components(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = self.network(w)  # (..., K, Dx) each
        tied = scale.log().mean(-2, keepdim=True).exp()  # (..., 1, Dx)
        return loc, tied.expand_as(loc)


PRIORS = {"uniform": MixturePrior, "learned": LearnedWeightsPrior, "tied": TiedScalePrior}
