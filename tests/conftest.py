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
