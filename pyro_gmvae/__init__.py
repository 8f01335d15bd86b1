"""pyro_gmvae: the Gaussian Mixture VAE for deep unsupervised clustering, in Pyro.

Dilokthanakul et al., "Deep Unsupervised Clustering with Gaussian Mixture Variational
Autoencoders", arXiv:1611.02648.

Importing the package changes no Pyro setting; building a model or an ELBO here keeps
parameters module-local (:func:`pyro_gmvae.objective.use_module_local_params`).  It adds
two warning filters, for the notices of tqdm and ArviZ named below.
"""

__version__ = "0.1.0"

import warnings  # noqa: E402

# Two notices that concern no user of this package, each silenced by its exact message, here
# before the first import of pyro.infer or arviz:
# - in a Jupyter kernel without ipywidgets, tqdm.auto (imported by pyro.infer, and drawing this
#   package's bars) warns "IProgress not found" and falls back to text bars, which show the
#   same progress;
# - ArviZ 0.x warns on its first import of each day that its 1.0 is a rewrite; the export
#   here is written for, and pinned to, ArviZ 0.x (pyproject: arviz<1).
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning)

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
