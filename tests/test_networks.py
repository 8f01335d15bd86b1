"""Encoder trunks, decoders and the prior network: exact output shapes, broadcasting over
Pyro's extra leading dimensions, and the original's convolution layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_gmvae.networks import (
    CONV_LAYOUTS,
    DECODERS,
    SCALE_FLOOR,
    TRUNKS,
    ConvDecoder,
    ConvTrunk,
    PriorNetwork,
    positive_scale,
)

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("network", ["fc", "conv"])
@pytest.mark.parametrize("data_shape", IMAGE_SHAPES)
@pytest.mark.parametrize("num_params", [1, 2])
def test_decoder_output_is_exactly_the_image(network, data_shape, num_params):
    decoder = DECODERS[network](latent_dim=6, hidden_dim=20, data_shape=data_shape, num_params=num_params)
    out = decoder(torch.randn(5, 6))
    assert out.shape == (5, num_params, *data_shape)


@pytest.mark.parametrize("network", ["fc", "conv"])
@pytest.mark.parametrize("data_shape", IMAGE_SHAPES)
def test_trunk_maps_an_image_to_hidden(network, data_shape):
    trunk = TRUNKS[network](data_shape, hidden_dim=20)
    assert trunk(torch.rand(5, *data_shape)).shape == (5, 20)
    assert trunk.out_dim == 20


@pytest.mark.parametrize("network", ["fc", "conv"])
@pytest.mark.parametrize("data_shape", IMAGE_SHAPES)
def test_networks_broadcast_over_leading_dims(network, data_shape):
    """Pyro adds particle and enumeration dimensions on the left; each slice must get the
    same result as if it were passed alone (eval mode, so BatchNorm uses running stats)."""
    torch.manual_seed(0)
    trunk = TRUNKS[network](data_shape, hidden_dim=12).eval()
    decoder = DECODERS[network](latent_dim=4, hidden_dim=12, data_shape=data_shape).eval()
    y = torch.rand(2, 3, 4, *data_shape)
    h = trunk(y)
    assert h.shape == (2, 3, 4, 12)
    torch.testing.assert_close(h[1, 2], trunk(y[1, 2]))
    x = torch.randn(2, 3, 4, 4)
    out = decoder(x)
    assert out.shape == (2, 3, 4, 1, *data_shape)
    torch.testing.assert_close(out[0, 1], decoder(x[0, 1]))


def _layers(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


def _spatial_sizes(module, inp):
    sizes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: sizes.append(tuple(o.shape[1:])))
        for m in _layers(module, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    module(inp)
    for hook in hooks:
        hook.remove()
    return sizes


def test_mnist_conv_layout_is_the_originals():
    """models/ConvAE.lua: conv 6x6 16, conv 6x6 32, conv 4x4/2 pad 1 64, conv 9x9 H; the
    generator mirrors it with full (transposed) convolutions."""
    trunk = ConvTrunk((1, 28, 28), hidden_dim=50)
    convs = _layers(trunk, nn.Conv2d)
    assert [c.kernel_size for c in convs] == [(6, 6), (6, 6), (4, 4), (9, 9)]
    assert [c.stride for c in convs] == [(1, 1), (1, 1), (2, 2), (1, 1)]
    assert [c.padding for c in convs] == [(0, 0), (0, 0), (1, 1), (0, 0)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 50]
    assert len(_layers(trunk, nn.BatchNorm2d)) == 4
    assert _spatial_sizes(trunk, torch.rand(2, 1, 28, 28)) == [(16, 23, 23), (32, 18, 18), (64, 9, 9), (50, 1, 1)]

    decoder = ConvDecoder(latent_dim=8, hidden_dim=50, data_shape=(1, 28, 28))
    deconvs = _layers(decoder, nn.ConvTranspose2d)
    assert [c.kernel_size for c in deconvs] == [(9, 9), (4, 4), (6, 6), (6, 6)]
    assert [c.stride for c in deconvs] == [(1, 1), (2, 2), (1, 1), (1, 1)]
    assert [c.out_channels for c in deconvs] == [64, 32, 16, 1]
    assert [lin.out_features for lin in _layers(decoder, nn.Linear)] == [50]
    sizes = _spatial_sizes(decoder, torch.randn(2, 8))
    assert sizes == [(64, 9, 9), (32, 18, 18), (16, 23, 23), (1, 28, 28)]


def test_svhn_conv_layout_is_the_originals():
    """models/SVHNConvAE.lua: four 4x4 convolutions, the first three stride 2 pad 1
    (32 -> 16 -> 8 -> 4), the last one to 1x1; the generator mirrors it."""
    trunk = ConvTrunk((3, 32, 32), hidden_dim=40)
    convs = _layers(trunk, nn.Conv2d)
    assert [c.kernel_size for c in convs] == [(4, 4)] * 4
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1)]
    assert convs[0].in_channels == 3
    assert _spatial_sizes(trunk, torch.rand(2, 3, 32, 32)) == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (40, 1, 1)]
    decoder = ConvDecoder(latent_dim=8, hidden_dim=40, data_shape=(3, 32, 32), num_params=2)
    sizes = _spatial_sizes(decoder, torch.randn(2, 8))
    assert sizes == [(64, 4, 4), (32, 8, 8), (16, 16, 16), (6, 32, 32)]
    assert set(CONV_LAYOUTS) == {(28, 28), (32, 32)}


@pytest.mark.parametrize("cls", [ConvTrunk, ConvDecoder])
def test_conv_rejects_other_image_sizes(cls):
    with pytest.raises(ValueError, match="28x28 or 32x32"):
        cls((1, 30, 30), 10) if cls is ConvTrunk else cls(4, 10, (1, 30, 30))


def test_prior_network_shapes_and_positive_scales():
    prior = PriorNetwork(w_dim=3, hidden_dim=16, x_dim=5, num_clusters=4)
    loc, scale = prior(torch.randn(2, 7, 3))
    assert loc.shape == scale.shape == (2, 7, 4, 5)
    assert (scale >= SCALE_FLOOR).all()
    # softplus grows linearly, so huge raw values stay finite (the original's exp did not)
    big = positive_scale(torch.tensor([-1e4, 0.0, 1e4]))
    assert torch.isfinite(big).all() and big[0] >= SCALE_FLOOR
