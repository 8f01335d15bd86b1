"""Observation models p(y | x): small modules that turn decoder output into a distribution.

A likelihood says how many parameter maps it needs per data value (``num_params``), the
decoder produces them, and ``likelihood(decoder_output)`` returns a distribution whose
event shape is the data shape.  Add a new one by subclassing :class:`Likelihood` and
registering it in :data:`LIKELIHOODS`; the model never needs editing.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import _sum_rightmost
from torch.nn import functional as F

from pyro_gmvae.networks import positive_scale


class GreyBernoulli(dist.Bernoulli):
    """Bernoulli with logits whose ``log_prob`` accepts grey levels in [0, 1].

    ``log_prob(y) = y log p + (1 - y) log(1 - p)``: the binary cross-entropy the paper
    trains MNIST with, on the raw grey levels (no binarisation).
    """

    support = constraints.unit_interval

    def log_prob(self, value):
        return -self.cross_entropy(value)

    def cross_entropy(self, value):
        """``-log_prob(value)``: ``binary_cross_entropy_with_logits`` per element."""
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return F.binary_cross_entropy_with_logits(logits, value, reduction="none")


class GreyBernoulliImage(dist.Independent):
    """``GreyBernoulli(logits).to_event(n)`` whose ``log_prob`` negates after the sum over the image.

    ``-(sum of the cross-entropies)`` where ``Independent`` sums their negations: the same
    floats (negation is exact and rounding symmetric in sign, and the sum runs in the same
    order), without a pass over the (B, *data_shape) tensor forward and another backward.
    """

    def log_prob(self, value):
        return -_sum_rightmost(self.base_dist.cross_entropy(value), self.reinterpreted_batch_ndims)


class Likelihood(nn.Module):
    """Base class: maps decoder output ``(..., num_params, *data_shape)`` to p(y | x)."""

    #: Number of decoder maps per data value.
    num_params: int = 1
    #: Closed interval the data must lie in, or None for the whole real line.
    data_range: tuple[float, float] | None = None

    def forward(self, decoder_out: torch.Tensor, data_dims: int) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, decoder_out: torch.Tensor, data_dims: int) -> torch.Tensor:
        """Mean of p(y | x), shape ``decoder_out.shape[:-data_dims-1] + data_shape``."""
        return self(decoder_out, data_dims).base_dist.mean


class BernoulliLikelihood(Likelihood):
    """Bernoulli on grey levels in [0, 1]; the decoder gives logits."""

    num_params = 1
    data_range = (0.0, 1.0)

    def forward(self, decoder_out, data_dims):
        logits = decoder_out.select(-data_dims - 1, 0)
        return GreyBernoulliImage(GreyBernoulli(logits=logits), data_dims)


class GaussianLikelihood(Likelihood):
    """Gaussian with a location and a per-dimension scale, both from the decoder."""

    num_params = 2

    def forward(self, decoder_out, data_dims):
        loc = decoder_out.select(-data_dims - 1, 0)
        scale = positive_scale(decoder_out.select(-data_dims - 1, 1))
        return dist.Normal(loc, scale).to_event(data_dims)


LIKELIHOODS = {"bernoulli": BernoulliLikelihood, "gaussian": GaussianLikelihood}
