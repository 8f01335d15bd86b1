"""The augmentation-consistency term (--augment-weight): the moves, the term's closed form,
its gradients, and a run with it that resumes bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resume_is_bit_for_bit, image_dataset

from pyro_gmvae import Config, train
from pyro_gmvae.augment import JITTER_STD, ConsistencyTerm, affine, check_shape, consistency, random_affine, random_move
from pyro_gmvae.build import build_model_and_guide


def _dot(height=9, width=9, row=4, col=4) -> torch.Tensor:
    y = torch.zeros(1, 1, height, width)
    y[0, 0, row, col] = 1.0
    return y


def test_no_move_is_the_identity():
    y = torch.rand(3, 1, 12, 12)
    torch.testing.assert_close(affine(y, torch.zeros(3, 4)), y, atol=1e-6, rtol=0)  # float32 grid rounding


@pytest.mark.parametrize("u, moved_to", [((0, 0, 0.5, 0), (4, 5)), ((0, 0, 0, 0.5), (5, 4)), ((0, 0, -1, -1), (2, 2))])
def test_shifts_are_whole_pixels_right_and_down(u, moved_to):
    """u2, u3 = 0.5 move the image by one pixel (2 x 0.5) right, down; -1 by two left, up."""
    out = affine(_dot(), torch.tensor([u], dtype=torch.float64))[0, 0]
    expected = _dot(row=moved_to[0], col=moved_to[1])[0, 0]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_rotation_turns_about_the_centre_by_the_angle():
    """u0 = 1 turns by MAX_DEGREES (10): a dot 6 pixels right of the centre keeps its
    distance from the centre and moves to the angle +-10 degrees (bilinear centre of mass)."""
    size, r = 25, 6.0
    y = _dot(size, size, row=12, col=12 + int(r))
    out = affine(y, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64))[0, 0]
    rows, cols = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    mass = out.sum()
    cy, cx = float((out * rows).sum() / mass) - 12, float((out * cols).sum() / mass) - 12
    assert math.hypot(cx, cy) == pytest.approx(r, abs=0.1)
    assert abs(math.degrees(math.atan2(cy, cx))) == pytest.approx(10.0, abs=1.0)


def test_scale_grows_about_the_centre():
    """u1 = 1 scales by 1 + MAX_SCALE (1.1): a dot 10 pixels from the centre lands 11 away."""
    size = 31
    y = _dot(size, size, row=15, col=25)
    out = affine(y, torch.tensor([[0, 1.0, 0, 0]], dtype=torch.float64))[0, 0]
    cols = torch.arange(float(size))
    cx = float((out.sum(0) * cols).sum() / out.sum()) - 15
    assert cx == pytest.approx(11.0, abs=0.05)


def test_random_moves_follow_the_generator_and_keep_the_range():
    y = torch.rand(16, 1, 28, 28)
    a = random_affine(y, torch.Generator().manual_seed(5))
    b = random_affine(y, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == y.shape
    assert not torch.equal(a, random_affine(y, torch.Generator().manual_seed(6)))
    assert a.min() >= 0 and a.max() <= 1  # bilinear weights sum to at most one: grey levels stay grey levels
    flat = random_affine(y.reshape(16, 28, 28), torch.Generator().manual_seed(5))  # (B, H, W) images
    assert torch.equal(flat, a.reshape(16, 28, 28))


def test_consistency_is_the_negative_log_probability_of_one_cluster():
    torch.manual_seed(0)
    log_a = torch.log_softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    log_b = torch.log_softmax(torch.randn(5, 4, dtype=torch.float64), -1)
    by_hand = -torch.log((log_a.exp() * log_b.exp()).sum(-1))
    torch.testing.assert_close(consistency(log_a, log_b), by_hand)
    sure = torch.log(torch.tensor([[1.0, 1e-30, 1e-30]], dtype=torch.float64))
    assert float(consistency(sure, sure)) == pytest.approx(0.0, abs=1e-12)
    uniform = torch.full((1, 4), math.log(0.25), dtype=torch.float64)
    assert float(consistency(uniform, uniform)) == pytest.approx(math.log(4))


@pytest.mark.parametrize("guide_name", ["v2", "v1"])
def test_term_reaches_encoder_and_mixture(guide_name):
    config = Config(data="mnist", guide=guide_name, hidden_dim=32, x_dim=4, w_dim=3, K=3).resolved()
    model, guide = build_model_and_guide(config, (1, 28, 28))
    term = ConsistencyTerm(model, guide, torch.Generator().manual_seed(0))
    value = term(torch.rand(8, 1, 28, 28), torch.arange(8))
    assert value.shape == () and 0 <= float(value.detach()) <= math.log(3) + 1e-5
    value.backward()
    trunk = [p.grad for p in guide.encoder.parameters() if p.grad is not None]
    assert trunk and all(torch.isfinite(g).all() for g in trunk) and any(g.abs().sum() > 0 for g in trunk)
    if guide_name == "v2":  # r is the mixture's posterior: the prior network learns from it too
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prior.parameters())


def test_run_with_the_term_logs_it_and_resumes_bit_for_bit(tmp_path):
    flags = dict(
        data="images.npz", network="fc", likelihood="bernoulli", K=3, x_dim=4, w_dim=3, hidden_dim=16,
        batch_size=16, lr=1e-3, augment_weight=5.0, seed=1, progress=False, init="random",
    )  # fmt: skip
    one, _, _ = assert_resume_is_bit_for_bit(tmp_path, flags, image_dataset, epochs=4, stop=2)
    assert all(0 < row["augment"] <= math.log(3) + 1e-5 for row in one.history)
    plain_flags = {**flags, "augment_weight": 0.0}
    plain = train(
        Config(epochs=1, out=str(tmp_path / "plain"), **plain_flags), data=image_dataset(), make_figures=False
    )
    assert "augment" not in plain.history[0]


def test_feature_vectors_get_seeded_gaussian_jitter():
    """A (B, D) batch moves by JITTER_STD x N(0, 1) per entry, drawn from the generator alone."""
    y = torch.zeros(4000, 5)
    a = random_move(y, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, random_move(y, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - JITTER_STD) < 0.005
    images = torch.rand(2, 1, 12, 12)  # images still get the affine move, from the same draws
    torch.testing.assert_close(
        random_move(images, torch.Generator().manual_seed(4)), random_affine(images, torch.Generator().manual_seed(4))
    )


@pytest.mark.parametrize(
    "shape, ok", [((2,), True), ((30,), True), ((1, 28, 28), True), ((2, 2), False), ((2, 3, 4, 5), False)]
)
def test_the_term_takes_images_and_feature_vectors(shape, ok):
    if ok:
        check_shape(shape, "x.npz")
    else:
        with pytest.raises(Exception, match="feature vectors"):
            check_shape(shape, "x.npz")


def test_the_term_on_feature_vectors_trains_the_encoder():
    config = Config(data="x.npz", K=3, x_dim=2, w_dim=2, hidden_dim=8, likelihood="gaussian").resolved()
    model, guide = build_model_and_guide(config, (6,))
    value = ConsistencyTerm(model, guide, torch.Generator().manual_seed(0))(torch.randn(8, 6))
    assert value.shape == () and 0 <= float(value.detach()) <= math.log(3) + 1e-5
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.encoder.parameters())
