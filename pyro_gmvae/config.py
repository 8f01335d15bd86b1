"""Run configuration: every option with its default, help, choices and check, in one place.

``Config`` holds what a run needs.  Each field carries its command-line help, its valid
values and its check in ``field(metadata=...)`` (made by :func:`option`); the flags of
``experiments/run.py`` (:func:`add_arguments`) and :meth:`Config.validate` are derived
from them.  ``DATA_PRESETS`` fills the options a user left unset (``None``) per data set,
and the resolved config is saved with every checkpoint, so a run folder rebuilds alone.

To add an option: add a field with ``option(default, help, check=..., choices=...)``,
read it where it is used, and, if it depends on the data set, give it a value in every
preset.  The flag, its help and its validation follow.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from pyro_gmvae.errors import UserInputError
from pyro_gmvae.tensorboard_log import check_installed as _tensorboard_installed

PRESET = "data preset"  # the default shown for options a preset fills

# Per-data defaults, starting from the original run.sh.  Spiral uses a higher learning rate
# and fewer epochs than the original's 500, so the default run takes about a minute on
# 2 CPU cores; lr 1e-2 collapsed seed 1 to 2 clusters, 3e-3 separates the arms for seeds 0-2.
# MNIST: 10 epochs of VAE pretraining, components seated on k-means of a UMAP embedding of
# the latent means and fitted to that partition for 3 epochs (grid k10umap), then 10 GMVAE
# epochs at Adam 1e-4, CV weight 2.0, no KL warm-up (it scrambles the seated start) and the
# augmentation-consistency term at weight 100 (without it the GMVAE phase moves the start's
# partition away from the digit classes); weight and epochs chosen on the validation split
# (grids augment and augmentmore in experiments/results/mnist_val.md), scored in grid
# k10augment (experiments/results/mnist.md); the fit's partition term kept through the first
# 3 GMVAE epochs with a falling weight (--init-anchor-epochs 3: against the first epoch's
# drop; chosen on 3 validation seeds, grid anchor), scored in grid k10anchor.  The original's run.sh
# setting (conv, K 14, lr 1e-4, batch 50, 100 epochs) is not measured here.  npz: a user's
# file, small fully connected defaults.
_NETWORK = ("network", "likelihood", "x_dim", "w_dim", "K", "hidden_dim", "batch_size", "cv_weight", "epochs", "lr")
_START = (
    "kl_warmup", "init", "pretrain_epochs", "init_restarts", "init_fit_epochs", "augment_weight", "init_anchor_epochs",
)  # fmt: skip
DATA_PRESETS = {
    name: dict(zip(_NETWORK + _START, values, strict=True))
    for name, values in {
        "spiral": ("fc", "gaussian", 2, 2, 8, 100, 200, 2.0, 60, 3e-3, 0, "random", 3, 1, 0, 0.0, 0),
        "mnist": ("fc", "bernoulli", 200, 150, 10, 500, 256, 2.0, 10, 1e-4, 0, "vae-umap", 10, 1, 3, 100.0, 3),
        "svhn": ("conv", "bernoulli", 200, 150, 10, 500, 128, 0.0, 100, 1e-4, 0, "random", 3, 1, 0, 0.0, 0),
        "npz": ("fc", "gaussian", 10, 10, 10, 256, 100, 0.0, 50, 1e-3, 0, "random", 3, 1, 0, 0.0, 0),
    }.items()
}
# Options a .npz file's automatic defaults set but no static preset does: their value
# everywhere else (and in runs saved before they existed).
UNPRESET_DEFAULTS = {"init_select": "probe", "balance_weight": 0.0, "balance_tolerance": 0.0, "init_weights": "uniform"}
INITS = ("random", "vae-kmeans", "vae-umap")
INIT_WEIGHTS = ("uniform", "partition")
# The options of a vae-* start and their value under --init random (which has no partition).
_RANDOM_START = (("init_restarts", 1), ("init_fit_epochs", 0), ("init_anchor_epochs", 0), ("init_weights", "uniform"))
ELBO_MODES = ("compiled", "eager")
ADAM_KERNELS = ("auto", "fused")


def flag(name: str) -> str:
    """The command-line flag of a field: ``x_dim`` -> ``--x-dim``."""
    return "--" + name.replace("_", "-")


# --- checks: each raises UserInputError with a one-line message naming the flag ----------
def positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"{flag(name)} must be a positive integer, got {value}")


def non_negative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserInputError(f"{flag(name)} must be an integer >= 0, got {value}")


def positive_number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise UserInputError(f"{flag(name)} must be a positive number, got {value}")


def non_negative_number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise UserInputError(f"{flag(name)} must be a finite number >= 0, got {value}")


def _data_set(name: str, value) -> None:
    from pyro_gmvae.data import DATASETS

    if not isinstance(value, str) or not (value in DATASETS or value.endswith(".npz")):
        raise UserInputError(f"unknown {flag(name)} {value!r}; choose one of {', '.join(DATASETS)}")


def _registry(module: str, table: str) -> Callable[[], list[str]]:
    """The sorted names of a name-to-class table, read when asked (no import cycle)."""
    return lambda: sorted(getattr(importlib.import_module(module), table))


def option(default, help: str, *, check: Callable | None = None, choices=None, optional: bool = False, **extra):
    """A ``Config`` field with its command-line help, valid values and check.

    ``choices``: a tuple of names or a callable returning them (a registry).  ``check(name,
    value)`` raises UserInputError; ``optional`` skips it for ``None``.  ``extra`` goes to
    ``add_argument`` (``action``, ``dest`` and a custom ``flag``).
    """
    meta = dict(help=help, check=check, choices=choices, optional=optional, **extra)
    return field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> list[str] | None:
    choices = f.metadata.get("choices")
    return list(choices()) if callable(choices) else choices


@dataclass
class Config:
    """Every option of a run.  ``None`` means "take it from the data preset"."""

    data: str = option("spiral", "spiral | spiral-original | mnist | svhn | PATH.npz", check=_data_set)
    data_root: str | None = option(None, "folder holding the data sets (default $PYRO_GMVAE_DATA, then ./data)")
    download: bool = option(False, "let torchvision download MNIST / SVHN into --data-root", action="store_true")
    network: str | None = option(None, "encoder/decoder family", choices=_registry("pyro_gmvae.networks", "TRUNKS"))
    likelihood: str | None = option(None, "p(y|x)", choices=_registry("pyro_gmvae.likelihoods", "LIKELIHOODS"))
    prior: str = option(
        "uniform",
        "uniform: the paper's fixed pi; learned: pi learned; tied: one scale shared by the K components",
        choices=_registry("pyro_gmvae.priors", "PRIORS"),
    )
    guide: str = option("v2", "v2: exact p(z|x,w); v1: q(z|y) head", choices=_registry("pyro_gmvae.guides", "GUIDES"))
    K: int | None = option(None, "number of clusters", check=positive_int)
    x_dim: int | None = option(None, "Dx, size of x", check=positive_int)
    w_dim: int | None = option(None, "Dw, size of w", check=positive_int)
    hidden_dim: int | None = option(None, "H, hidden units", check=positive_int)
    epochs: int | None = option(None, "total epochs; with --resume, train up to this many", check=positive_int)
    batch_size: int | None = option(None, "minibatch size (the global batch under torchrun)", check=positive_int)
    lr: float | None = option(None, "Adam learning rate (of the first epoch, with --lr-final)", check=positive_number)
    lr_final: float | None = option(
        None,
        "cosine decay of the learning rate to this by the last epoch (unset: constant)",
        check=positive_number,
        optional=True,
    )
    prior_lr: float | None = option(
        None,
        "Adam learning rate of the prior network (mu_k(w), sigma_k(w)) in the GMVAE phase, scaled with --lr by "
        "--lr-final; the encoder and decoder keep --lr (default: --lr)",
        check=positive_number,
        optional=True,
    )
    mc_samples: int = option(1, "M, Monte Carlo samples of (x, w) per example", check=positive_int)
    elbo: str = option(
        "compiled",
        "compiled: each training step replays a traced graph of TraceEnum_ELBO's loss (same loss and "
        "gradients, less Python per step); eager: Pyro's own step",
        choices=ELBO_MODES,
    )
    adam_kernel: str = option(
        "auto",
        "auto: torch's fused Adam kernel on a GPU, its default kernel on the CPU (the committed CPU results were "
        "made with it); fused: the fused kernel on the CPU too (a much faster optimiser step, float32 rounding "
        "differs)",
        choices=ADAM_KERNELS,
    )
    flush_denormal: bool = option(
        False,
        "treat denormal floats (below 1.2e-38 in float32) as zero on the CPU for the run: matrix products "
        "slow down many times on them, and long runs from scratch at large K meet them "
        "(experiments/bench_denormal.py); off by default, the committed results were made without it",
        action="store_true",
    )
    kl_warmup: int | None = option(
        None, "epochs over which the KL terms' weight rises linearly to 1 (0: off)", check=non_negative_int
    )
    init: str | None = option(
        None,
        "random: PyTorch's initialisation; vae-kmeans: pretrain a VAE, seat the components on k-means of its "
        "latent means; vae-umap: the same with k-means on a UMAP embedding of them",
        choices=INITS,
    )
    pretrain_epochs: int | None = option(None, "VAE epochs of --init vae-*", check=positive_int)
    pretrain_lr: float = option(1e-3, "Adam learning rate of that pretraining and of the fit", check=positive_number)
    init_restarts: int | None = option(
        None, "--init vae-*: make this many starts, keep the one with the lowest probe objective", check=positive_int
    )
    init_select: str | None = option(
        None,
        "--init-restarts: keep the start with the lowest probe objective (probe), or the one whose partition "
        "agrees most with the other starts' (consensus: highest mean adjusted Rand index; no probe) "
        "(default: probe; consensus for a .npz file)",
        choices=("probe", "consensus"),
    )
    init_probe_epochs: int = option(2, "GMVAE epochs each start trains before it is scored", check=positive_int)
    init_fit_epochs: int | None = option(
        None,
        "--init vae-*: train the seated GMVAE this many epochs on its objective plus --init-fit-weight x the "
        "cross-entropy to the partition (0: off)",
        check=non_negative_int,
    )
    init_fit_weight: float = option(10.0, "weight of that cross-entropy", check=non_negative_number)
    init_weights: str | None = option(
        None,
        "--init vae-*: the cluster weights pi after the start: 1/K (uniform), or the start partition's cluster "
        "proportions (partition, as a Gaussian mixture started from k-means; a learned pi trains on from there) "
        "(default: uniform)",
        choices=INIT_WEIGHTS,
    )
    init_anchor_epochs: int | None = option(
        None,
        "--init vae-*: keep the cross-entropy to the start's partition in the first N GMVAE epochs, its weight "
        "falling linearly: epoch e adds --init-fit-weight x (N + 1 - e) / (N + 1) x that term (0: off)",
        check=non_negative_int,
    )
    z_prior_weight: float = option(1.0, "eta, weight of the z-prior KL", check=non_negative_number)
    cv_weight: float | None = option(None, "alpha, consistency-violation weight", check=non_negative_number)
    free_bits: float = option(0.0, "lambda, free-bits threshold of the z prior (0: off)", check=non_negative_number)
    balance_weight: float | None = option(
        None,
        "gamma, weight of KL(minibatch mean of p(z|x,w) || pi) per example: a cluster taking more than its "
        "share of a batch costs every example (0: off) (default: 0; 10 for a .npz file without --labels)",
        check=non_negative_number,
    )
    balance_tolerance: float | None = option(
        None,
        "tau, nats of KL(minibatch mean of p(z|x,w) || pi) the balance term lets pass: it costs gamma x max(0, KL "
        "- tau), so a batch spread unevenly but not collapsed costs nothing (default: 0, every imbalance costs)",
        check=non_negative_number,
    )
    augment_weight: float | None = option(
        None,
        "weight of the augmentation-consistency term -log sum_k r(k|y) r(k|y') per example, added to the loss "
        "of the GMVAE phase: y' is a moved copy of y (an image rotated by up to 10 degrees, scaled by 0.9-1.1 "
        "and shifted by up to 2 pixels; a feature vector plus Gaussian noise of 0.1 per standardised feature), "
        "and y and y' should share a cluster (0: off)",
        check=non_negative_number,
    )
    seed: int = option(0, "random seed")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    out: str | None = option(None, "run folder (default: a fresh runs/<data>-<guide>-K<K>-seed<seed>-<N>)")
    validation: int | None = option(
        None,
        "hold out the last N training examples and evaluate on them instead of the test split "
        "(choose settings on this; score the test split once, without it)",
        check=positive_int,
        optional=True,
    )
    train_subset: int | None = option(None, "use only the first N training examples", check=positive_int, optional=True)
    test_subset: int | None = option(None, "use only the first N test examples", check=positive_int, optional=True)
    progress: bool = option(True, "no progress bar", action="store_false", flag="--no-progress")
    tensorboard: bool = option(
        False,
        "also write the per-epoch metrics as TensorBoard event files into <run folder>/tensorboard "
        '(needs the extra: pip install -e ".[tensorboard]")',
        check=_tensorboard_installed,
        action="store_true",
    )
    labels: int = option(
        0,
        "semi-supervised: observe the class of N training examples (a seeded draw balanced over classes, "
        "saved in labels.json; needs labelled data and --K = the number of classes; the start is --init random "
        "unless given; 0: unsupervised)",
        check=non_negative_int,
    )
    pseudo_labels: int = option(
        0,
        "self-training, no label read: after the --init vae-* start, observe z for the N training examples "
        "it assigns most confidently (N/K per cluster, their own cluster; saved in labels.json), weighted by "
        "--label-weight as --labels does; 0: off",
        check=non_negative_int,
    )
    label_weight: float = option(
        1.0,
        "with --labels or --pseudo-labels: weight of the classifier term -log r(z = label) of the guide's "
        "cluster posterior on labelled examples (v1: q(z|y); v2: p(z|x,w) at the posterior means)",
        check=non_negative_number,
    )
    standardize: str | None = option(
        None,
        "features: scale every feature to mean 0 and std 1 with the training split's statistics (the test "
        "split with the same ones); default: features for a .npz file with the Gaussian likelihood, else none",
        choices=("none", "features"),
    )
    binarize: str = option(
        "none",
        "dynamic: fresh Bernoulli pixels from the grey levels every epoch for training, a fixed seeded "
        "binarisation of the test set (Bernoulli likelihood only)",
        choices=("none", "dynamic"),
    )

    def preset_name(self) -> str:
        if self.data.endswith(".npz"):
            return "npz"
        return "spiral" if self.data.startswith("spiral") else self.data

    def resolved(self, data_defaults: dict | None = None) -> Config:
        """A copy with every ``None`` filled from the data preset.

        ``data_defaults`` (option values derived from the data, as
        :func:`pyro_gmvae.autoconfig.npz_defaults` gives for a ``.npz`` file) take the
        place of the preset's values where they overlap; options the user set win over both.
        """
        preset = {**DATA_PRESETS.get(self.preset_name(), DATA_PRESETS["npz"]), **(data_defaults or {})}
        values = dataclasses.asdict(self)
        for key, default in preset.items():
            if values.get(key) is None:
                values[key] = default
        for key, default in UNPRESET_DEFAULTS.items():
            if values[key] is None:
                values[key] = default
        if values["standardize"] is None:  # a user's table of features: put each on the decoder's scale
            gaussian_npz = self.preset_name() == "npz" and values["likelihood"] == "gaussian"
            values["standardize"] = "features" if gaussian_npz else "none"
        if values["labels"] and self.init is None:  # the labels order the components: no vae-* start
            values["init"] = "random"
        if values["labels"] and self.balance_weight is None:  # nor a balance term chosen for unlabelled starts
            values["balance_weight"] = 0.0
        if (values["labels"] or values["pseudo_labels"]) and self.init_anchor_epochs is None:  # see validate
            values["init_anchor_epochs"] = 0
        if values["init"] == "random":  # a preset's restarts, fit and anchor go with its --init vae-*
            for key, off in _RANDOM_START:
                if getattr(self, key) is None:
                    values[key] = off
        return Config(**values)

    def validate(self) -> None:
        """Check a resolved config against every field's choices and check; raise UserInputError."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            valid = choices_of(f)
            if valid is not None and value not in valid:
                raise UserInputError(f"unknown {flag(f.name)} {value!r}; choose one of {', '.join(valid)}")
            if meta.get("check") and not (value is None and meta.get("optional")):
                meta["check"](f.name, value)
        if self.init == "random":
            for key, off in _RANDOM_START:
                if getattr(self, key) != off:
                    raise UserInputError(
                        f"{flag(key)} needs --init vae-kmeans or vae-umap (PyTorch's initialisation has no partition)"
                    )

        if self.init_anchor_epochs and (self.labels or self.pseudo_labels):  # their steps index another array
            raise UserInputError("--init-anchor-epochs does not combine with --labels or --pseudo-labels yet")
        if self.pseudo_labels and (self.init == "random" or self.labels):
            raise UserInputError("--pseudo-labels needs an --init vae-* start and no --labels")
        if self.binarize != "none" and self.likelihood != "bernoulli":
            raise UserInputError(
                f"--binarize {self.binarize} needs --likelihood bernoulli (pixels in [0, 1]); got {self.likelihood}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        """A config from saved values; keys of removed options (``extra``) are dropped, and
        options added since take the value that leaves such a run as it was (:data:`ADDED_KEYS`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(REMOVED_KEYS))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**{**ADDED_KEYS, **{k: v for k, v in values.items() if k in known}})


REMOVED_KEYS = ("extra",)  # in configs saved by earlier versions; ignored on load
# Options whose field default is filled per data set (None), with the value a run saved
# before they existed had in effect.
ADDED_KEYS = {"standardize": "none", "augment_weight": 0.0, "init_anchor_epochs": 0, **UNPRESET_DEFAULTS}


# --- the command line, derived from the fields ---------------------------------------------
_TYPES = {"int": int, "float": float, "str": str}


def _arg_type(f: dataclasses.Field):
    names = str(f.type).replace(" ", "").split("|")
    return _TYPES.get(names[0], str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Config`` field, with its help, choices and default taken from the field.

    No argparse ``choices`` or ``type`` errors: they span several lines, and
    :meth:`Config.validate` names the valid values in one.  Pass ``argument_default=
    argparse.SUPPRESS`` to the parser so that only flags the user gives reach the config.
    """
    presets = {key for values in DATA_PRESETS.values() for key in values}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        help_text = meta["help"]
        valid = choices_of(f)
        if valid:
            help_text += f"; one of {' | '.join(valid)}"
        if "action" in meta:
            parser.add_argument(meta.get("flag", flag(f.name)), dest=f.name, action=meta["action"], help=help_text)
            continue
        default = PRESET if f.name in presets else f.default
        if default is not None and "(default" not in help_text:
            help_text += f" (default: {default})"
        parser.add_argument(flag(f.name), dest=f.name, type=_arg_type(f), metavar=f.name.upper(), help=help_text)


def presets_table() -> str:
    """The data presets as a plain-text table (for ``--help``)."""
    names = list(DATA_PRESETS)
    keys = list(DATA_PRESETS[names[0]])
    width = max(map(len, keys)) + 2
    lines = ["data presets (the defaults of options left unset):", " " * width + "".join(f"{n:>10}" for n in names)]
    lines += [f"{k:<{width}}" + "".join(f"{DATA_PRESETS[n][k]!s:>10}" for n in names) for k in keys]
    lines.append(
        "npz: a .npz file's options come from its training array (pyro_gmvae.autoconfig.npz_defaults; "
        "--show-config shows them); the column only fills what those rules leave unset, K"
    )
    return "\n".join(lines)
