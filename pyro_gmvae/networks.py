"""Neural networks of the GMVAE: encoder trunks, decoders and the prior network.

Every network acts on the trailing dimensions only, so it broadcasts over the extra
leading dimensions that Pyro adds for particles and for the enumerated cluster variable.
Layouts follow the original Torch7 code (Nat-D/GMVAE, ``models/*.lua``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

#: Lower bound on every learned scale.  Softplus keeps scales positive and, unlike the
#: original's raw ``exp(logvar)``, grows only linearly, so it cannot overflow; the floor
#: keeps log-densities finite when a unit saturates at zero.
SCALE_FLOOR = 1e-3


def positive_scale(raw: torch.Tensor) -> torch.Tensor:
    """Map an unconstrained tensor to a positive, finite scale (softplus plus a floor)."""
    return F.softplus(raw) + SCALE_FLOOR


def _flatten_leading(t: torch.Tensor, event_dims: int) -> tuple[torch.Tensor, torch.Size]:
    # BatchNorm and convolutions want exactly one batch dimension; Pyro may add more.
    batch_shape = t.shape[: t.dim() - event_dims]
    return t.reshape((-1,) + t.shape[t.dim() - event_dims :]), batch_shape


class FCTrunk(nn.Module):
    """Linear, BatchNorm, ReLU, twice (the original recogniser)."""

    def __init__(self, data_shape: tuple[int, ...], hidden_dim: int):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.out_dim = hidden_dim
        in_dim = math.prod(self.data_shape)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        flat, batch_shape = _flatten_leading(y, len(self.data_shape))
        h = self.net(flat.reshape(flat.shape[0], -1))  # (N, H)
        return h.reshape(batch_shape + (self.out_dim,))


class FCDecoder(nn.Module):
    """Linear, ReLU, twice, then a linear read-out of ``num_params`` maps per data value."""

    def __init__(self, latent_dim: int, hidden_dim: int, data_shape, num_params: int = 1):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.num_params = num_params
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, num_params * math.prod(self.data_shape)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return decoder output of shape ``x.shape[:-1] + (num_params, *data_shape)``."""
        out = self.net(x)
        return out.reshape(x.shape[:-1] + (self.num_params,) + self.data_shape)


# Convolution layouts of the original (Nat-D/GMVAE): (kernel, stride, padding) per layer,
# channels f, 2f, 4f, then H.  MNIST (``models/ConvAE.lua``), spatial sizes
# 28 -> 23 -> 18 -> 9 -> 1; SVHN (``models/SVHNConvAE.lua``), 32 -> 16 -> 8 -> 4 -> 1.
# The decoders mirror them with transposed convolutions (1 -> 9 -> 18 -> 23 -> 28 and
# 1 -> 4 -> 8 -> 16 -> 32).  SVHNConvAE.lua leaves the filter count unset; we use 16.
CONV_LAYOUTS = {
    (28, 28): ((6, 1, 0), (6, 1, 0), (4, 2, 1), (9, 1, 0)),
    (32, 32): ((4, 2, 1), (4, 2, 1), (4, 2, 1), (4, 1, 0)),
}


def _conv_layout(data_shape) -> tuple:
    channels, height, width = data_shape
    if (height, width) not in CONV_LAYOUTS:
        raise ValueError(f"conv network needs 28x28 or 32x32 images, got {height}x{width}")
    return CONV_LAYOUTS[(height, width)]


class ConvTrunk(nn.Module):
    """The original convolutional recogniser (C x 28 x 28 or C x 32 x 32 -> H).

    Four convolutions with BatchNorm and ReLU, channels f, 2f, 4f, H; the last one ends at
    1x1 (see ``CONV_LAYOUTS``).
    """

    def __init__(self, data_shape: tuple[int, ...], hidden_dim: int, num_filters: int = 16):
        super().__init__()
        layout = _conv_layout(data_shape)
        f = num_filters
        self.data_shape = tuple(data_shape)
        self.out_dim = hidden_dim
        widths = (data_shape[0], f, 2 * f, 4 * f, hidden_dim)
        layers = []
        for (kernel, stride, padding), c_in, c_out in zip(layout, widths[:-1], widths[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        flat, batch_shape = _flatten_leading(y, 3)
        h = self.net(flat)  # (N, H, 1, 1)
        return h.reshape(batch_shape + (self.out_dim,))


class ConvDecoder(nn.Module):
    """The original transposed-convolution generator (latent -> P x C x 28 x 28 or 32 x 32).

    Linear(Dx -> H), BatchNorm, ReLU, then the trunk's layout in reverse with transposed
    convolutions; no BatchNorm or activation after the last one (the likelihood applies it).
    """

    def __init__(self, latent_dim: int, hidden_dim: int, data_shape, num_params: int = 1, num_filters: int = 16):
        super().__init__()
        layout = _conv_layout(data_shape)
        f = num_filters
        self.data_shape = tuple(data_shape)
        self.num_params = num_params
        self.hidden_dim = hidden_dim
        self.inp = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
        widths = (hidden_dim, 4 * f, 2 * f, f, num_params * data_shape[0])
        layers = []
        for i, ((kernel, stride, padding), c_in, c_out) in enumerate(
            zip(reversed(layout), widths[:-1], widths[1:], strict=True)
        ):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding))
            if i < len(layout) - 1:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, batch_shape = _flatten_leading(x, 1)
        h = self.inp(flat).reshape(-1, self.hidden_dim, 1, 1)
        out = self.net(h)  # (N, P*C, H, W)
        return out.reshape(batch_shape + (self.num_params,) + self.data_shape)


class PriorNetwork(nn.Module):
    """w -> (K component locations, K component scales) for x.

    Linear(Dw -> H), tanh, then K linear heads for the means and K for the scales (stored
    as one Linear of width K * Dx each, which is the same map).
    """

    def __init__(self, w_dim: int, hidden_dim: int, x_dim: int, num_clusters: int):
        super().__init__()
        self.x_dim = x_dim
        self.num_clusters = num_clusters
        self.hidden = nn.Sequential(nn.Linear(w_dim, hidden_dim), nn.Tanh())
        self.loc_head = nn.Linear(hidden_dim, num_clusters * x_dim)
        self.scale_head = nn.Linear(hidden_dim, num_clusters * x_dim)

    def forward(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(w)
        shape = w.shape[:-1] + (self.num_clusters, self.x_dim)
        loc = self.loc_head(h).reshape(shape)  # (..., K, Dx)
        scale = positive_scale(self.scale_head(h)).reshape(shape)  # (..., K, Dx)
        return loc, scale


TRUNKS = {"fc": FCTrunk, "conv": ConvTrunk}
DECODERS = {"fc": FCDecoder, "conv": ConvDecoder}
