"""``--binarize dynamic``: Bernoulli pixels drawn from the grey levels, as in the literature
on binarised MNIST (e.g. the VampPrior paper's "dynamically binarised MNIST").

- Training: every epoch draws fresh pixels ``y ~ Bernoulli(grey)`` for the whole training
  set (:func:`epoch_draw`), from a seed taken from the run's data-order generator, which
  the checkpoint saves: a resumed run draws the same pixels as one trained in one go.
- Test: one fixed binarisation (:func:`fixed_binarization`, seed :data:`TEST_SEED`, the
  same for every run and every epoch), applied where the data are prepared, so training,
  ``Run.load_data`` and ``experiments/evaluate.py --loglik`` all score the same 0/1 images.
"""

from __future__ import annotations

import torch

TEST_SEED = 20161213  # one test binarisation for every run, whatever its --seed


def _bernoulli(grey: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=grey.device).manual_seed(seed)
    return torch.bernoulli(grey, generator=generator)


def fixed_binarization(grey: torch.Tensor, seed: int = TEST_SEED) -> torch.Tensor:
    """0/1 pixels drawn once from ``grey`` in [0, 1] with ``seed``: the same tensor every call."""
    return _bernoulli(grey, seed)


def epoch_draw(grey: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fresh 0/1 pixels for one epoch; the seed comes from ``generator`` (a CPU generator),
    the draw runs on ``grey``'s device."""
    seed = int(torch.randint(2**62, (), generator=generator))
    return _bernoulli(grey, seed)


def prepare(config, data) -> None:
    """With ``config.binarize == "dynamic"``, replace ``data.x_test`` by its fixed binarisation."""
    if getattr(config, "binarize", "none") == "dynamic":
        data.x_test = fixed_binarization(data.x_test)
