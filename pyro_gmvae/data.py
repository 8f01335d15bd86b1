"""Data sets: the spiral toy set, MNIST, SVHN and a user's ``.npz`` arrays.

Everything returns a :class:`Dataset` of float32 tensors in memory.  Small data sets go to
the device as one tensor and batches are index slices (see ``training``), which is far
faster than a per-item DataLoader.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyro_gmvae.errors import UserInputError

logger = logging.getLogger(__name__)

DATA_ENV = "PYRO_GMVAE_DATA"
DATASETS = ("spiral", "spiral-original", "mnist", "svhn", "PATH.npz")


@dataclass
class Dataset:
    """Train and test arrays.  ``labels`` are int64 or None when the data has none."""

    name: str
    x: torch.Tensor  # (N, *data_shape) float32
    labels: torch.Tensor | None
    x_test: torch.Tensor
    labels_test: torch.Tensor | None
    scaling: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std) of --standardize features

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def default_data_root() -> str:
    return os.environ.get(DATA_ENV) or "./data"


# --- spiral -------------------------------------------------------------------------
def make_spiral(num_points: int = 5000, seed: int = 0, num_arms: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The original's 5-arm crescent set, regenerated with labels.

    Recipe (measured from the original file, see shared/data/spiral/README.md): arm c is
    an arc of radius 0.36 around C_c = 0.6 (cos b_c, sin b_c), b_c = 4 deg + 72 deg c; the
    angle along the arc is N(0, 0.56^2) around b_c + 90 deg; radial noise has std 0.025.

    Returns ``(points (N, 2) float32, labels (N,) int64)``, shuffled.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_arms, size=num_points)
    base = np.deg2rad(4.0) + 2 * np.pi / num_arms * labels
    centre = 0.6 * np.stack([np.cos(base), np.sin(base)], -1)
    phi = base + np.pi / 2 + rng.normal(0.0, 0.56, size=num_points)
    radius = 0.36 + 0.025 * rng.normal(size=num_points)
    points = centre + radius[:, None] * np.stack([np.cos(phi), np.sin(phi)], -1)
    return points.astype(np.float32), labels.astype(np.int64)


def load_spiral(num_train: int = 5000, num_test: int = 1000) -> Dataset:
    """Generated spiral set with arm labels; the test split comes from another seed."""
    x, labels = make_spiral(num_train, seed=0)
    x_test, labels_test = make_spiral(num_test, seed=1)
    return Dataset(
        "spiral", torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(x_test), torch.from_numpy(labels_test)
    )


def load_spiral_csv(root: str) -> Dataset:
    """The original repository's 5000-point set (``<root>/spiral/spiral.csv``, no labels).

    There is no test split in the original; the last 1000 rows serve as one.
    """
    path = Path(root) / "spiral" / "spiral.csv"
    _require_file(path, "the original spiral set")
    x = torch.from_numpy(np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32))
    return Dataset("spiral-original", x[:4000], None, x[4000:], None)


# --- images -------------------------------------------------------------------------
def _require_file(path: Path, what: str, downloadable: bool = False) -> None:
    if not path.is_file():
        fix = " or pass --download to fetch it there" if downloadable else ""
        raise UserInputError(
            f"{what} not found at {path}; set --data-root or ${DATA_ENV} to the folder that holds it{fix}"
        )


def _torchvision_split(cls, what: str, root, **kwargs):
    # torchvision raises RuntimeError / OSError / ValueError for missing, corrupt or
    # undownloadable files; say which data set and where instead of a traceback.
    try:
        return cls(root, **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        raise UserInputError(
            f"cannot load {what} from {root} ({err}); check the files there, or set --data-root / ${DATA_ENV}"
        ) from None


def _new_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _download(cls, what: str, root, folder: Path, files: list[str], hosts: list[str], **kwargs):
    """``cls(root, download=True, **kwargs)``: a torchvision data set that fetches its files
    into ``folder``.  A failed download raises one line (what failed, from where, where the
    files go) and removes the folders this call created, when they are empty."""
    created = _new_folders(folder)
    try:
        return cls(str(root), download=True, **kwargs)
    except (RuntimeError, OSError, ValueError) as err:  # URLError is an OSError
        for path in created:  # deepest first; a folder holding a finished download stays
            try:
                path.rmdir()
            except OSError:
                break
        # torchvision's message spans lines (one per mirror tried); its last line is the
        # last error, e.g. "<urlopen error [Errno -2] Name or service not known>".
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(err).__name__
        raise UserInputError(
            f"cannot download {what} from {', '.join(hosts)} ({reason}); check the connection, or copy "
            f"{', '.join(files)} into {folder} yourself and run without --download"
        ) from None


def _hosts(urls) -> list[str]:
    from urllib.parse import urlparse

    return list(dict.fromkeys(urlparse(url).netloc or url for url in urls))


def _torchvision_images(dataset) -> torch.Tensor:
    data = dataset.data
    data = torch.as_tensor(data)
    if data.dim() == 3:  # MNIST: (N, 28, 28) uint8
        data = data.unsqueeze(1)
    return data.to(torch.float32) / 255.0  # grey levels in [0, 1], no binarisation


def load_mnist(root: str, download: bool = False) -> Dataset:
    """MNIST through torchvision, pixels in [0, 1]: 60k train, 10k test."""
    from torchvision.datasets import MNIST

    raw = Path(root) / "MNIST" / "raw"
    if download:  # fetches all four files
        files = [name.removesuffix(".gz") for name, _ in MNIST.resources]
        train = _download(MNIST, "MNIST", root, raw, files, _hosts(MNIST.mirrors), train=True)
    else:
        _require_file(raw / "train-images-idx3-ubyte", "MNIST", downloadable=True)
        train = _torchvision_split(MNIST, "MNIST", root, train=True)
    test = _torchvision_split(MNIST, "MNIST", root, train=False)
    return Dataset(
        "mnist", _torchvision_images(train), train.targets.long(), _torchvision_images(test), test.targets.long()
    )


def _read_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One SVHN ``.mat`` file, decoded exactly as torchvision's ``SVHN`` does: ``X`` is
    (32, 32, 3, N) uint8 -> (N, 3, 32, 32) in [0, 1]; ``y`` (N, 1) in 1..10 with 10 = digit 0."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"]
    except Exception as err:  # scipy raises several types for corrupt files
        raise UserInputError(f"cannot read SVHN file {path} ({err}); download it again with --download") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise UserInputError(f"{path}: X has shape {x.shape} and y {y.shape}; SVHN needs (32, 32, 3, N) and (N, 1)")
    labels = y.astype(np.int64).reshape(-1)
    labels[labels == 10] = 0
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))).float() / 255.0
    return images, torch.from_numpy(labels)


def load_svhn(root: str, download: bool = False) -> Dataset:
    """SVHN (``<root>/svhn/{train,test}_32x32.mat``), pixels in [0, 1].

    torchvision downloads the files (``download=True``); they are then read directly with
    scipy, because torchvision's ``SVHN`` refuses any file whose md5 differs from the
    official one, even offline, which would rule out test files and re-saved copies.
    """
    folder = Path(root) / "svhn"
    splits = ("train", "test")
    if download:
        from torchvision.datasets import SVHN

        for split in splits:
            url, filename, _ = SVHN.split_list[split]
            _download(SVHN, f"SVHN {split} split", folder, folder, [filename], _hosts([url]), split=split)
    for split in splits:
        _require_file(folder / f"{split}_32x32.mat", f"SVHN {split} split", downloadable=True)
    x, labels = _read_svhn_mat(folder / "train_32x32.mat")
    x_test, labels_test = _read_svhn_mat(folder / "test_32x32.mat")
    return Dataset("svhn", x, labels, x_test, labels_test)


# --- user arrays --------------------------------------------------------------------
def load_npz(path: str) -> Dataset:
    """A user's arrays: ``x`` (N, ...) and optional ``labels``, ``x_test``, ``labels_test``.

    Without ``x_test`` the last 10% of ``x`` (at least one example) is held out as test.
    """
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"data file {file} not found; pass an existing .npz with an array named 'x'")
    try:
        arrays = dict(np.load(file, allow_pickle=False))
    except Exception as err:  # numpy raises several types for corrupt files
        raise UserInputError(f"cannot read {file} as .npz ({err}); save it with numpy.savez") from None
    if "x" not in arrays:
        raise UserInputError(f"{file} has no array 'x' (found {sorted(arrays)}); save the data as x=...")
    x = _as_float(arrays["x"], f"{file}:x")
    labels = _as_labels(arrays.get("labels"), len(x), f"{file}:labels")
    if "x_test" in arrays:
        x_test = _as_float(arrays["x_test"], f"{file}:x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise UserInputError(
                f"{file}: x_test has shape {tuple(x_test.shape)} but x has {tuple(x.shape)}; "
                "they must agree after the first dimension"
            )
        labels_test = _as_labels(arrays.get("labels_test"), len(x_test), f"{file}:labels_test")
    else:
        num_test = max(1, math.ceil(0.1 * len(x)))
        x, x_test = x[:-num_test], x[-num_test:]
        labels_test = None if labels is None else labels[-num_test:]
        labels = None if labels is None else labels[:-num_test]
    return Dataset(file.stem, x, labels, x_test, labels_test)


def _as_float(array: np.ndarray, what: str) -> torch.Tensor:
    if array.ndim < 2 or array.shape[0] == 0:
        raise UserInputError(f"{what} has shape {array.shape}; it needs (num_examples, features...)")
    if not np.issubdtype(array.dtype, np.number):
        raise UserInputError(f"{what} has dtype {array.dtype}; it must be numeric")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _as_labels(array, length: int, what: str) -> torch.Tensor | None:
    if array is None:
        return None
    if array.shape != (length,) or not np.issubdtype(array.dtype, np.integer):
        raise UserInputError(f"{what} must be integers of shape ({length},), got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


# --- entry point --------------------------------------------------------------------
def load_dataset(name: str, root: str | None = None, download: bool = False) -> Dataset:
    """Load a data set by name (``spiral``, ``spiral-original``, ``mnist``, ``svhn``) or path."""
    root = root or default_data_root()
    if name.endswith(".npz"):
        return load_npz(name)
    if name == "spiral":
        return load_spiral()
    if name == "spiral-original":
        return load_spiral_csv(root)
    if name == "mnist":
        return load_mnist(root, download)
    if name == "svhn":
        return load_svhn(root, download)
    raise UserInputError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def validate_dataset(data: Dataset, data_range: tuple[float, float] | None, batch_size: int) -> None:
    """Check values and sizes against the likelihood and the batch size; raise UserInputError."""
    for split, x in (("training", data.x), ("test", data.x_test)):
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=tuple(range(1, x.dim()))).sum())
            raise UserInputError(f"{data.name}: {bad} {split} examples hold NaN or infinite values; clean the data")
        if data_range is not None:
            low, high = data_range
            if x.min() < low or x.max() > high:
                raise UserInputError(
                    f"{data.name}: {split} values span [{x.min():.4g}, {x.max():.4g}] but the likelihood needs "
                    f"[{low:g}, {high:g}]; rescale the data or use --likelihood gaussian"
                )
    if len(data.x) < batch_size:
        raise UserInputError(
            f"{data.name}: {len(data.x)} training examples, fewer than the batch size {batch_size}; lower --batch-size"
        )


def select_splits(config, data: Dataset) -> Dataset:
    """The splits the options ask for: ``--validation`` first, then ``--train-subset`` / ``--test-subset``."""
    if config.validation:
        hold_out(data, config.validation)
    if config.train_subset:
        data.x = data.x[: config.train_subset]
        data.labels = None if data.labels is None else data.labels[: config.train_subset]
    if config.test_subset:
        data.x_test = data.x_test[: config.test_subset]
        data.labels_test = None if data.labels_test is None else data.labels_test[: config.test_subset]
    return data


def standardize_features(data: Dataset, eps: float = 1e-8) -> None:
    """``--standardize features``: every feature to mean 0, std 1 with the training split's statistics.

    The test split is transformed with the same mean and std (no test information reaches
    the model); a constant feature is only centred.  ``data.scaling`` keeps ``(mean, std)``,
    so ``x * std + mean`` gives the raw features back (the k-means baseline uses those).
    """
    dtype = data.x.dtype
    x = data.x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std < eps, torch.ones_like(std), std)
    data.x = ((x - mean) / std).to(dtype)
    data.x_test = ((data.x_test.double() - mean) / std).to(dtype)
    data.scaling = (mean.to(dtype), std.to(dtype))


def prepare_data(config, data: Dataset | None = None, *, split: bool = True) -> Dataset:
    """Load (unless given), split, validate and scale the data for a resolved config.

    ``split=False`` when :func:`select_splits` has been applied already.
    """
    from pyro_gmvae import binarize, semisupervised
    from pyro_gmvae.likelihoods import LIKELIHOODS

    if data is None:
        data = load_dataset(config.data, config.data_root, config.download)
    if split:
        select_splits(config, data)
    validate_dataset(data, LIKELIHOODS[config.likelihood].data_range, config.batch_size)
    if config.standardize == "features":
        standardize_features(data)
    binarize.prepare(config, data)  # --binarize dynamic: the fixed 0/1 test set
    semisupervised.check(config, data)  # --labels N: labels, K and N fit the data
    check_data_shape(config, data.data_shape)
    return data


def hold_out(data: Dataset, n: int) -> None:
    """Make the last ``n`` training examples the evaluation split (``--validation N``); the test split is dropped."""
    if n >= len(data.x):
        raise UserInputError(f"{data.name}: --validation {n} leaves no training examples ({len(data.x)} in all)")
    data.x_test, data.x = data.x[-n:], data.x[:-n]
    if data.labels is not None:
        data.labels_test, data.labels = data.labels[-n:], data.labels[:-n]
    else:
        data.labels_test = None


def check_data_shape(config, data_shape: tuple[int, ...]) -> None:
    """The conv networks only take C x 28 x 28 or C x 32 x 32 images; ``--augment-weight``
    only images and feature vectors."""
    from pyro_gmvae.augment import check_shape
    from pyro_gmvae.networks import CONV_LAYOUTS

    if config.augment_weight:
        check_shape(data_shape, config.data)

    if config.network == "conv" and (len(data_shape) != 3 or tuple(data_shape[1:]) not in CONV_LAYOUTS):
        sizes = " or ".join(f"C x {h} x {w}" for h, w in CONV_LAYOUTS)
        raise UserInputError(
            f"{config.data}: examples of shape {tuple(data_shape)} do not fit --network conv, which needs {sizes} "
            "images; use --network fc"
        )
