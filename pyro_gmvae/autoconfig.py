"""Defaults for a user's own ``.npz`` data, derived from the array alone.

:func:`npz_defaults` turns the training array into option values (``Config`` field
names), so that ``--data PATH.npz`` with no other flags clusters well without tuning;
:func:`pyro_gmvae.data.standardize_features` (``--standardize features``, on by default
for a ``.npz`` file with the Gaussian likelihood) is the matching preprocessing, and
:func:`kmeans_hungarian` the obvious baseline a run should beat.  Every rule was chosen
on validation splits carved from the training part of seven data sets
(``experiments/own_data.py --val``), never on a test split.
"""

from __future__ import annotations

import math

import numpy as np

# Optimiser steps of each phase, whatever the data size: an epoch of N examples in
# batches of B is N // B steps, so the epochs below are these budgets over N // B.
PRETRAIN_STEPS = 1500  # plain VAE pretraining of the start
FIT_STEPS = 300  # fit of the seated mixture to its partition
GMVAE_STEPS = 600  # GMVAE phase
RESTART_MAX_N = 5000  # up to this many examples, five starts are cheap enough


def is_unit_interval(x: np.ndarray) -> bool:
    """True when every value lies in [0, 1] (grey levels, binary data, proportions)."""
    return bool(np.min(x) >= 0.0 and np.max(x) <= 1.0)


def _epochs(steps: int, steps_per_epoch: int, low: int, high: int) -> int:
    return int(min(high, max(low, math.ceil(steps / steps_per_epoch))))


def _power_of_two_batch(size: float, low: int, n: int) -> int:
    """``size`` rounded to a power of two, within [low, 256], and never above ``n``."""
    return min(n, int(min(256, max(low, 2 ** round(math.log2(max(1.0, size)))))))


def npz_defaults(x: np.ndarray, num_clusters: int | None = None) -> dict:
    """Option values for training array ``x`` of shape (N, ...).

    Parameters
    ----------
    x : ndarray
        The training examples (N, *shape); only its shape and value range are read.
    num_clusters : int, optional
        K, if known; only bounds the batch size from below (a batch should hold every
        cluster) and is not returned (K is the user's choice).

    Returns
    -------
    dict
        ``Config`` field values.  The rules, with N examples of D = prod(shape) values:

        - ``likelihood``: ``bernoulli`` when every value is in [0, 1] (the grey-level
          cross-entropy of the paper), else ``gaussian`` on standardised features
          (``--standardize features``), which puts every feature on the decoder's scale.
        - ``hidden_dim`` H = 8 D rounded to a power of two, within [64, 512]: the
          network grows with the input, capped at the MNIST preset's 500.
        - ``x_dim`` Dx = 10 whatever D (N2D's embedding size).  A latent as narrow
          as the data (Dx = D = 2) distorts elongated clusters: on anisotropic blobs
          the start fell from 86 to 70 % with Dx = 2 (validation split).
        - ``w_dim`` Dw = 2: little freedom in w keeps the components from drifting
          away from the seated start (measured on MNIST).
        - ``batch_size`` B = N / 6, rounded to a power of two, within
          [max(16, 4 K), 256]: about six steps per epoch where the bounds allow.
        - ``init`` ``vae-umap`` with ``pretrain_epochs`` and ``init_fit_epochs`` set
          so that pretraining would take about :data:`PRETRAIN_STEPS` and the fit
          :data:`FIT_STEPS` optimiser steps in batches of N / 20 (rounded and bounded
          likewise): the start's length scales with N.  The phases are counted in these
          epochs and then run in the larger batches above, so in about a third to a
          quarter of those steps, each less noisy.  Chosen on the validation splits
          (``own_data_val.json``, 3 seeds, tags ``b64``, ``b128``, ``b32``, ``b256``):
          against batches of N / 20 over the same epochs, breast cancer 95.8 against
          92.9 % (its GMVAE phase no longer lowers the start), moons 91.0 against 89.0,
          anisotropic blobs 98.6 against 98.3, blobs 100 either way; iris and wine keep
          B = 16 (wine at 32: 94.7 %, the same).  A batch of 256 on the 2-D sets (840
          examples: three steps an epoch) weakened the start (anisotropic blobs 94.3 %,
          moons 88.7), hence N / 6 rather than N / 4; keeping the step budgets in the
          larger batches (tag ``b5steps``) scored lower than keeping the epochs (breast
          cancer 95.0, anisotropic blobs 96.0 %).
          ``init_restarts`` 5 when N <= :data:`RESTART_MAX_N`, else 1: on small sets,
          where the start varies most between seeds, five starts are made and the one
          whose partition agrees most with the others' is kept (``init_select``
          ``consensus``).
        - ``balance_weight`` gamma = 10: a cluster that swallows another costs every
          example (on one breast-cancer validation seed a good start, 95 %, collapsed to
          70 % as one cluster took nearly all examples).
        - Restarts, selection and balance were chosen together on the validation splits
          of six sets (``own_data_val.json``, 3 seeds each, tags ``cur``, ``cons5``,
          ``bal10``, ``cons5bal10``): mean validation accuracy 92.6 % with three starts
          ranked by the probe objective and no balance, 93.2 % with five starts by
          consensus, 92.8 % with gamma 10, 94.2 % with both (the highest, and the
          smallest spread between seeds); on the MNIST subset (N > 5000, one start)
          gamma 10 gave 84.0 % against 83.2 % (``mnist10k:bal10``, ``mnist10k:cur``).
        - ``epochs`` about :data:`GMVAE_STEPS` steps in batches of N / 20 (as above) with ``cv_weight`` 10, at ``lr``
          = 0.01 / D within [1e-4, 3e-4]: a short GMVAE phase that refines the start
          instead of undoing it.  At 1e-3 one breast-cancer seed of three fell from 94
          to 65 % (validation split) and MNIST drifts (stopped at 1e-4); 3e-4 beat
          1e-4 on small tabular sets (iris 85.7 against 84.1 %, breast cancer 93.3
          against 91.2 %, 3 seeds each).
    """
    x = np.asarray(x)
    n = int(x.shape[0])
    d = int(np.prod(x.shape[1:]))
    hidden = int(min(512, max(64, 2 ** round(math.log2(8 * d)))))
    low = max(16, 4 * (num_clusters or 1))
    batch = _power_of_two_batch(n / 6, low, n)
    steps = max(1, n // _power_of_two_batch(n / 20, low, n))  # of the batches the phases are counted in
    return dict(
        network="fc",
        likelihood="bernoulli" if is_unit_interval(x) else "gaussian",
        hidden_dim=hidden,
        x_dim=10,
        w_dim=2,
        batch_size=batch,
        lr=float(min(3e-4, max(1e-4, 1e-2 / d))),
        cv_weight=10.0,
        kl_warmup=0,
        init="vae-umap",
        init_restarts=5 if n <= RESTART_MAX_N else 1,
        init_select="consensus",
        balance_weight=10.0,
        pretrain_epochs=_epochs(PRETRAIN_STEPS, steps, 3, 500),
        init_fit_epochs=_epochs(FIT_STEPS, steps, 1, 100),
        epochs=_epochs(GMVAE_STEPS, steps, 3, 200),
    )


def kmeans_hungarian(x_train, x_test, labels_test, num_clusters: int, seed: int = 0) -> float:
    """The baseline: k-means (10 restarts) fitted on the raw training features, the
    test split assigned to the nearest centre, scored by Hungarian accuracy."""
    from sklearn.cluster import KMeans

    from pyro_gmvae.metrics import hungarian_accuracy

    flat = np.asarray(x_train, dtype=np.float64).reshape(len(x_train), -1)
    kmeans = KMeans(num_clusters, n_init=10, random_state=seed).fit(flat)
    pred = kmeans.predict(np.asarray(x_test, dtype=np.float64).reshape(len(x_test), -1))
    return hungarian_accuracy(pred, np.asarray(labels_test))


#: k-means of :func:`kmeans_baseline` is fitted on at most this many training examples, so
#: the baseline costs seconds even on MNIST's 60,000 images.
KMEANS_MAX_FIT = 10000


def kmeans_baseline(data, num_clusters: int, seed: int = 0) -> float:
    """:func:`kmeans_hungarian` for a :class:`~pyro_gmvae.data.Dataset`: fitted on the first
    :data:`KMEANS_MAX_FIT` training examples, scored on the test split, on the raw features
    (before ``--standardize features``)."""
    x_train, x_test = data.x[:KMEANS_MAX_FIT], data.x_test
    if data.scaling is not None:  # --standardize features: the baseline sees the raw features
        mean, std = (t.to(x_train.device) for t in data.scaling)
        x_train, x_test = x_train * std + mean, x_test * std + mean
    x_train = x_train.reshape(len(x_train), -1).cpu().numpy()
    x_test = x_test.reshape(len(x_test), -1).cpu().numpy()
    return kmeans_hungarian(x_train, x_test, data.labels_test.cpu().numpy(), num_clusters, seed)
