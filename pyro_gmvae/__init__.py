"""pyro_gmvae: the Gaussian Mixture VAE for deep unsupervised clustering, in Pyro.

Dilokthanakul et al., "Deep Unsupervised Clustering with Gaussian Mixture Variational
Autoencoders", arXiv:1611.02648.

Importing the package changes no Pyro setting; building a model or an ELBO here keeps
parameters module-local (:func:`pyro_gmvae.objective.use_module_local_params`).
"""

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
