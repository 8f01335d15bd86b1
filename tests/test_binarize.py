"""``--binarize dynamic``: fresh 0/1 training pixels every epoch, one fixed 0/1 test set, and
a resumed run (with ``--labels`` too) bit-identical to one trained in one go."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pyro_gmvae import Config, train, training
from pyro_gmvae.binarize import epoch_draw, fixed_binarization
from pyro_gmvae.data import Dataset, prepare_data
from pyro_gmvae.errors import UserInputError


def grey_digits(num_train: int = 300, num_test: int = 100) -> Dataset:
    """Three classes of 16-pixel grey images in [0, 1], each class lighting its own pixels."""
    gen = torch.Generator().manual_seed(0)
    patterns = torch.full((3, 16), 0.1)
    for c in range(3):
        patterns[c, 5 * c : 5 * c + 6] = 0.9

    def split(n):
        labels = torch.randint(3, (n,), generator=gen)
        x = (patterns[labels] + 0.05 * torch.randn(n, 16, generator=gen)).clamp(0, 1)
        return x, labels

    (x, labels), (x_test, labels_test) = split(num_train), split(num_test)
    return Dataset("grey", x, labels, x_test, labels_test)


SMALL = dict(
    data="grey.npz", likelihood="bernoulli", K=3, x_dim=2, w_dim=2, hidden_dim=16, batch_size=50, lr=3e-3,
    progress=False, binarize="dynamic", init="random",
)  # fmt: skip


def binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def test_test_binarisation_is_fixed_and_binary():
    grey = grey_digits().x_test
    one = fixed_binarization(grey)
    assert binary(one) and not binary(grey)
    assert torch.equal(one, fixed_binarization(grey))
    # Every run with --binarize dynamic scores the same test images, whatever its seed.
    a = prepare_data(Config(seed=0, **SMALL).resolved(), grey_digits())
    b = prepare_data(Config(seed=5, **SMALL).resolved(), grey_digits())
    assert torch.equal(a.x_test, one) and torch.equal(b.x_test, one)
    assert torch.equal(a.x, grey_digits().x)  # the training set stays grey: it is drawn every epoch
    plain = prepare_data(Config(**{**SMALL, "binarize": "none"}).resolved(), grey_digits())
    assert torch.equal(plain.x_test, grey)


def test_epoch_draws_are_binary_fresh_and_seeded():
    grey = grey_digits().x
    gen = torch.Generator().manual_seed(0)
    first, second = epoch_draw(grey, gen), epoch_draw(grey, gen)
    assert binary(first) and binary(second) and not torch.equal(first, second)
    again = torch.Generator().manual_seed(0)
    assert torch.equal(epoch_draw(grey, again), first)
    assert (first.mean() - grey.mean()).abs() < 0.02  # Bernoulli(grey): the same mean


def test_training_batches_change_between_epochs(tmp_path, monkeypatch):
    seen = []

    def recording(loss_fn, optimizer, x, *args, **kwargs):
        seen.append(x.clone())
        return run_epoch(loss_fn, optimizer, x, *args, **kwargs)

    run_epoch = training.run_epoch
    monkeypatch.setattr(training, "run_epoch", recording)
    train(Config(epochs=2, out=str(tmp_path / "run"), **SMALL), data=grey_digits(), make_figures=False)
    assert len(seen) == 2 and all(binary(x) for x in seen)
    assert not torch.equal(seen[0], seen[1])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["binarize"] == "dynamic"


def test_binarize_needs_the_bernoulli_likelihood():
    with pytest.raises(UserInputError, match="--binarize dynamic needs --likelihood bernoulli"):
        Config(**{**SMALL, "likelihood": "gaussian"}).resolved().validate()


@pytest.mark.parametrize("guide", ["v2", "v1"])
def test_resume_with_binarize_and_labels_is_bit_identical(tmp_path, guide):
    def run(epochs, out, resume=False):
        config = Config(epochs=epochs, out=str(out), guide=guide, labels=9, **SMALL)
        return train(config, resume=resume, data=dataclasses.replace(grey_digits()), make_figures=False)

    one_go = run(4, tmp_path / "one")
    run(2, tmp_path / "half")
    resumed = run(4, tmp_path / "half", resume=True)
    for name in ("model", "guide"):
        a, b = getattr(one_go, name).state_dict(), getattr(resumed, name).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after resume"
    untimed = [{k: v for k, v in row.items() if k not in ("seconds", "elapsed")} for row in one_go.history]
    assert untimed == [{k: v for k, v in row.items() if k not in ("seconds", "elapsed")} for row in resumed.history]
    assert "acc_supervised" in resumed.final
