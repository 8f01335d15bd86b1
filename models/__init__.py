"""Generative models.  Installed as ``pyro_gmvae.models``."""

from pyro_gmvae.models.gmvae import GMVAE

__all__ = ["GMVAE"]
