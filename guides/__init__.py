"""Recognition networks (guides).  Installed as ``pyro_gmvae.guides``."""

from pyro_gmvae.guides.gmvae import GUIDES, ClusterHeadGuide, Encoder, ExactGuide

__all__ = ["GUIDES", "ClusterHeadGuide", "Encoder", "ExactGuide"]
