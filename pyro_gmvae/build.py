"""Pairing model and guide from a resolved :class:`~pyro_gmvae.config.Config`.

This is the one place that turns names (``"fc"``, ``"gaussian"``, ``"v1"``) into objects;
model and guide code never branch on strings, and nothing here branches on the kind of
guide: each guide class builds itself and says what the model regularises.
"""

from __future__ import annotations

from pyro_gmvae.config import Config
from pyro_gmvae.guides import GUIDES
from pyro_gmvae.likelihoods import LIKELIHOODS
from pyro_gmvae.models import GMVAE
from pyro_gmvae.networks import DECODERS, TRUNKS
from pyro_gmvae.objective import Regularization, use_module_local_params
from pyro_gmvae.priors import PRIORS


def build_model_and_guide(config: Config, data_shape: tuple[int, ...]):
    """Build the GMVAE model and its guide for data of shape ``data_shape``.

    ``config`` must be resolved and valid (:meth:`Config.validate`).  Returns ``(model, guide)``.
    """
    use_module_local_params()
    reg = Regularization(
        z_prior_weight=config.z_prior_weight,
        cv_weight=config.cv_weight,
        free_bits=config.free_bits,
        balance_weight=config.balance_weight,
        balance_tolerance=config.balance_tolerance,
    )
    likelihood = LIKELIHOODS[config.likelihood]()
    prior = PRIORS[config.prior](config.K, config.x_dim, config.w_dim, config.hidden_dim)
    decoder = DECODERS[config.network](config.x_dim, config.hidden_dim, data_shape, likelihood.num_params)
    trunk = TRUNKS[config.network](data_shape, config.hidden_dim)
    guide_cls = GUIDES[config.guide]
    guide = guide_cls.build(trunk, config, prior, reg)
    model = GMVAE(prior, likelihood, decoder, data_shape, guide_cls.model_regularization(reg))
    return model, guide
