"""pyro_gmvae: the Gaussian Mixture VAE for deep unsupervised clustering, in Pyro.

Dilokthanakul et al., "Deep Unsupervised Clustering with Gaussian Mixture Variational
Autoencoders", arXiv:1611.02648.
"""

import pyro

# Parameters live in the modules, not in Pyro's global parameter store, so two models in
# one notebook never collide (Pyro's recommended setting for PyroModule + torch loops).
pyro.settings.set(module_local_params=True)

__version__ = "0.1.0"

from pyro_gmvae.arviz_export import to_inference_data  # noqa: E402
from pyro_gmvae.config import Config  # noqa: E402
from pyro_gmvae.loglik import loglik  # noqa: E402
from pyro_gmvae.metrics import clustering_metrics  # noqa: E402
from pyro_gmvae.posterior import assign, cluster_probs, components, encode, reconstruct, sample  # noqa: E402
from pyro_gmvae.runs import Run, load_run  # noqa: E402
from pyro_gmvae.training import train  # noqa: E402

__all__ = [
    "Config",
    "Run",
    "assign",
    "cluster_probs",
    "clustering_metrics",
    "components",
    "encode",
    "load_run",
    "loglik",
    "reconstruct",
    "sample",
    "to_inference_data",
    "train",
]
