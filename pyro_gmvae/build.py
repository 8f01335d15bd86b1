"""Pairing model and guide from a resolved :class:`~pyro_gmvae.config.Config`.

This is the one place that turns names (``"fc"``, ``"gaussian"``, ``"v1"``) into objects;
model and guide code never branch on strings.
"""

from __future__ import annotations

from pyro_gmvae.config import Config
from pyro_gmvae.guides import GUIDES, ClusterHeadGuide, Encoder
from pyro_gmvae.likelihoods import LIKELIHOODS
from pyro_gmvae.models import GMVAE
from pyro_gmvae.networks import DECODERS, TRUNKS
from pyro_gmvae.objective import Regularization
from pyro_gmvae.priors import PRIORS

CHOICES = {
    "network": sorted(TRUNKS),
    "likelihood": sorted(LIKELIHOODS),
    "prior": sorted(PRIORS),
    "guide": sorted(GUIDES),
}


def regularization(config: Config) -> Regularization:
    return Regularization(z_prior_weight=config.z_prior_weight, cv_weight=config.cv_weight, free_bits=config.free_bits)


def build_model_and_guide(config: Config, data_shape: tuple[int, ...]):
    """Build the GMVAE model and its guide for data of shape ``data_shape``.

    ``config`` must be resolved (no ``None`` left).  Returns ``(model, guide)``.
    """
    for key, valid in CHOICES.items():
        if getattr(config, key) not in valid:
            raise ValueError(f"unknown {key} {getattr(config, key)!r}; choose one of {', '.join(valid)}")
    reg = regularization(config)
    likelihood = LIKELIHOODS[config.likelihood]()
    prior = PRIORS[config.prior](config.K, config.x_dim, config.w_dim, config.hidden_dim)
    decoder = DECODERS[config.network](config.x_dim, config.hidden_dim, data_shape, likelihood.num_params)
    trunk = TRUNKS[config.network](data_shape, config.hidden_dim)
    guide_cls = GUIDES[config.guide]
    model = GMVAE(prior, likelihood, decoder, data_shape, reg, cluster_posterior=guide_cls.cluster_posterior)
    if guide_cls is ClusterHeadGuide:
        encoder = Encoder(trunk, config.x_dim, config.w_dim, config.K)
        guide = ClusterHeadGuide(encoder, reg, cluster_log_weights=prior.cluster_log_weights)
    else:
        guide = guide_cls(Encoder(trunk, config.x_dim, config.w_dim))
    return model, guide
