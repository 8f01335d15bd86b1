"""The augmentation-consistency term (``--augment-weight``): an example and a slightly moved
copy of it should fall in the same cluster.

For each training batch y, :func:`random_move` draws a copy y' of every example.  An image
(``(C, H, W)`` or ``(H, W)``) is rotated by up to 10 degrees, scaled by up to 10 % and
shifted by up to 2 pixels (:func:`random_affine`: bilinear resampling, zeros outside).  A
feature vector (``(D,)``, a ``.npz`` table, standardised by ``--standardize features``) gets
Gaussian noise of :data:`JITTER_STD` standard deviations per feature (:func:`random_jitter`):
nearby points should share a cluster, the cluster assumption itself.  With r(z | y) the
guide's cluster posterior at the posterior means (``guide.cluster_log_probs``; for the v2
guide the model's exact p(z | x, w)),

    consistency(y) = -log sum_k r(k | y) r(k | y')          (nats per example, >= 0)

is the probability that the two copies land in the same cluster, as a negative log; it is
smallest when both posteriors put all their mass on the same cluster.  Training adds
``augment_weight x`` its minibatch mean to the loss, outside the ELBO (as the fit to a
partition adds its cross-entropy); evaluation is unchanged.  The term carries what a digit's
class is invariant to, which the GMVAE's likelihood does not know: without it, the MNIST
default's GMVAE phase moves the start's partition away from the classes (see
``experiments/results/drift.md``).  The draws come from the training loop's shuffle
generator, which every checkpoint saves, so a resumed run draws what an uninterrupted one
would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyro_gmvae.errors import UserInputError

MAX_DEGREES = 10.0
MAX_SCALE = 0.1  # relative
MAX_SHIFT_PIXELS = 2.0
JITTER_STD = 0.1  # per feature, in the units of standardised features


def is_image_shape(data_shape: tuple[int, ...]) -> bool:
    """Examples of this shape are images, (C, H, W) or (H, W), at least 4 x 4."""
    return len(data_shape) in (2, 3) and min(data_shape[-2:]) >= 4


def check_shape(data_shape: tuple[int, ...], data: str) -> None:
    """Refuse ``--augment-weight`` for examples that are neither images nor feature vectors."""
    if len(data_shape) != 1 and not is_image_shape(data_shape):
        raise UserInputError(
            f"--augment-weight moves images or feature vectors; {data} has examples of shape "
            f"{tuple(data_shape)}, not (C, H, W), (H, W) or (D,); pass --augment-weight 0"
        )


def random_move(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The moved copies of a batch: :func:`random_jitter` for vectors (B, D), else :func:`random_affine`."""
    return random_jitter(y, generator) if y.dim() == 2 else random_affine(y, generator)


def random_jitter(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``y`` (B, D) plus Gaussian noise of :data:`JITTER_STD` per entry, drawn on the CPU from
    ``generator`` (B x D numbers), so the copies depend only on its state, whatever the device."""
    noise = torch.randn(y.shape, generator=generator, dtype=torch.float64) * JITTER_STD
    return y + noise.to(y)


def random_affine(y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A randomly rotated, scaled and shifted copy of each image of ``y`` (B, [C,] H, W).

    Angles, scales and shifts are uniform within :data:`MAX_DEGREES`, :data:`MAX_SCALE` and
    :data:`MAX_SHIFT_PIXELS`, drawn on the CPU from ``generator`` (4 numbers per image), so
    the copies depend only on the generator's state, whatever the device.
    """
    u = torch.rand(len(y), 4, generator=generator, dtype=torch.float64) * 2 - 1  # (B, 4) in [-1, 1)
    return affine(y, u)


def affine(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Move each image of ``y`` (B, [C,] H, W) by its row of ``u`` (B, 4) in [-1, 1]: rotation
    ``u0 x`` :data:`MAX_DEGREES`, scale ``1 + u1 x`` :data:`MAX_SCALE`, shifts right and down
    by ``u2, u3 x`` :data:`MAX_SHIFT_PIXELS` pixels (bilinear resampling, zeros outside)."""
    batch, (height, width) = len(y), y.shape[-2:]
    images = y.reshape(batch, -1, height, width)
    u = u.to(torch.float64)
    angle = u[:, 0] * math.radians(MAX_DEGREES)
    scale = 1 + u[:, 1] * MAX_SCALE
    # affine_grid maps output to input coordinates over [-1, 1]: one pixel is 2 / size of
    # them, and an image moved right by s pixels samples its input s pixels to the left.
    shift_x, shift_y = -u[:, 2] * MAX_SHIFT_PIXELS * 2 / width, -u[:, 3] * MAX_SHIFT_PIXELS * 2 / height
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], -1), torch.stack([sin, cos, shift_y], -1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(y.shape)


def consistency(log_r: torch.Tensor, log_r_moved: torch.Tensor) -> torch.Tensor:
    """-log sum_k r(k|y) r(k|y') per example, shape (B,), from the two (B, K) log posteriors."""
    return -torch.logsumexp(log_r + log_r_moved, -1)


class ConsistencyTerm:
    """``(y, idx) -> mean consistency`` of a batch: the ``extra_loss`` of
    :func:`pyro_gmvae.loop.run_epoch` (``idx`` is not used)."""

    def __init__(self, model, guide, generator: torch.Generator):
        self.model, self.guide, self.generator = model, guide, generator

    def __call__(
        self, y: torch.Tensor, idx: torch.Tensor | None = None, log_r: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``log_r``: the batch's (B, K) log r(z | y), if the caller has it already."""
        if log_r is None:
            log_r = self.guide.cluster_log_probs(self.model, self.guide.encode(y))
        moved = random_move(y, self.generator)
        log_r_moved = self.guide.cluster_log_probs(self.model, self.guide.encode(moved))
        return consistency(log_r, log_r_moved).mean()
