"""Shared test set-up: seeded RNGs, Pyro validation on, a tiny synthetic mixture, and
the data root pointed at ../shared/data (where CI and developers keep real MNIST)."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("PYRO_GMVAE_DATA", str(SHARED_DATA))
# Two busy torch processes on two cores stall each other with OpenMP spin-waits.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _seed_and_validate():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.enable_validation(False)


@pytest.fixture
def tiny_mixture():
    """A 3-component 4-D Gaussian mixture: (x (60, 4), labels (60,))."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    centres = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])
    x = centres[labels] + 0.3 * torch.randn(60, 4, generator=gen)
    return x, labels


def mnist_available() -> bool:
    return (Path(os.environ["PYRO_GMVAE_DATA"]) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


requires_mnist = pytest.mark.skipif(not mnist_available(), reason="MNIST not found under $PYRO_GMVAE_DATA")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load_script(name: str):
    """``experiments/<name>.py`` as a fresh module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_dataset(n: int = 96, seed: int = 0):
    """``n`` random 1x12x12 images in [0, 1] with 3 random classes; the last 32 are the test split."""
    from pyro_gmvae.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 12, 12, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return Dataset("images", x[: n - 32], labels[: n - 32], x[n - 32 :], labels[n - 32 :])


def assert_resume_is_bit_for_bit(tmp_path: Path, flags: dict, data, epochs: int, stop: int):
    """Train ``flags`` on ``data()`` for ``epochs`` in one go (folder ``one``) and, in folder
    ``two``, to ``stop`` then resumed to ``epochs``; assert the same history (less timings)
    and the same model and guide bit for bit.  Returns the whole run and both checkpoints."""
    from pyro_gmvae import Config, train
    from pyro_gmvae.checkpoint import CHECKPOINT_NAME, load_checkpoint

    one = train(Config(epochs=epochs, out=str(tmp_path / "one"), **flags), data=data(), make_figures=False)
    train(Config(epochs=stop, out=str(tmp_path / "two"), **flags), data=data(), make_figures=False)
    two = train(Config(epochs=epochs, out=str(tmp_path / "two"), **flags), data=data(), resume=True, make_figures=False)
    untimed = [
        [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in run.history] for run in (one, two)
    ]
    assert untimed[0] == untimed[1]
    a, b = (load_checkpoint(tmp_path / name / CHECKPOINT_NAME) for name in ("one", "two"))
    for part in ("model", "guide"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    return one, a, b
