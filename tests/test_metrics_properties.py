"""Property tests (hypothesis) for the clustering metrics and the data validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_gmvae.data import Dataset, validate_dataset
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.metrics import clustering_metrics, hungarian_accuracy, purity

FAST = settings(max_examples=50, deadline=None)
LABEL_INVARIANT = ("acc_hungarian", "purity", "nmi", "ari")


@st.composite
def clusterings(draw, max_n: int = 40):
    """Cluster probabilities (N, K) and labels (N,), with tiny N, K > N and empty clusters."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, 12))  # often > n for tiny n, so some clusters are empty
    num_classes = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    if draw(st.booleans()) and k > 1:
        logits[:, rng.integers(k)] = -np.inf  # a cluster nobody can use
    logits[:, 0] = np.where(np.isinf(logits).all(1), 0.0, logits[:, 0])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = rng.integers(num_classes, size=n)
    return probs, labels


def _close(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


@FAST
@given(clusterings(), st.randoms())
def test_permuting_cluster_ids_changes_nothing(data, rnd):
    probs, labels = data
    perm = list(range(probs.shape[1]))
    rnd.shuffle(perm)
    before = clustering_metrics(probs, labels)
    after = clustering_metrics(probs[:, perm], labels)
    _close(before, after, before.keys())


@FAST
@given(clusterings(), st.randoms())
def test_relabelling_classes_changes_nothing(data, rnd):
    probs, labels = data
    names = list(range(20))
    rnd.shuffle(names)  # a bijection onto possibly larger, non-contiguous ids
    relabelled = np.array(names)[labels]
    before = clustering_metrics(probs, labels)
    after = clustering_metrics(probs, relabelled)
    _close(before, after, LABEL_INVARIANT)


@FAST
@given(clusterings())
def test_ranges_and_ordering(data):
    probs, labels = data
    m = clustering_metrics(probs, labels)
    for key in ("acc_paper", "acc_hungarian", "purity", "nmi"):
        assert 0.0 <= m[key] <= 1.0 + 1e-12, key
    assert -1.0 <= m["ari"] <= 1.0 + 1e-12
    assert m["acc_hungarian"] <= m["purity"] + 1e-12  # one-to-one never beats many-to-one
    assert 1 <= m["clusters_used"] <= min(probs.shape)
    assert 0.0 <= m["marginal_entropy"] <= np.log(probs.shape[1]) + 1e-9


@FAST
@given(st.integers(1, 3), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_tiny_data_sets(n, k, seed):
    rng = np.random.default_rng(seed)
    assignments = rng.integers(k, size=n)
    labels = rng.integers(3, size=n)
    assert 0.0 < hungarian_accuracy(assignments, labels) <= purity(assignments, labels) <= 1.0
    probs = np.eye(k)[assignments]
    m = clustering_metrics(probs, labels)
    assert m["clusters_used"] == len(set(assignments.tolist()))
    assert all(np.isfinite(v) for v in m.values())


def test_perfect_and_single_cluster_cases():
    labels = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(8)[np.array([5, 5, 1, 1, 7, 7])]  # K = 8 > 3 classes, 5 empty clusters
    m = clustering_metrics(perfect, labels)
    assert m["acc_hungarian"] == m["purity"] == m["acc_paper"] == 1.0
    assert m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)
    one = np.eye(8)[np.zeros(6, dtype=int)]
    m = clustering_metrics(one, labels)
    assert m["acc_hungarian"] == pytest.approx(1 / 3) and m["clusters_used"] == 1


# --- data validation --------------------------------------------------------------------
@st.composite
def arrays(draw):
    n = draw(st.integers(1, 30))
    d = draw(st.integers(1, 5))
    values = draw(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32), min_size=n * d, max_size=n * d)
    )
    return np.array(values, dtype=np.float32).reshape(n, d)


def _dataset(x: np.ndarray, x_test: np.ndarray | None = None) -> Dataset:
    x_test = x[:1] if x_test is None else x_test
    return Dataset("prop", torch.from_numpy(x), None, torch.from_numpy(x_test), None)


@FAST
@given(arrays(), st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 10**6), st.booleans())
def test_nonfinite_values_always_raise(x, bad, where, in_test):
    x = x.copy()
    x.flat[where % x.size] = bad
    data = _dataset(np.zeros_like(x), x) if in_test else _dataset(x)
    with pytest.raises(UserInputError, match="NaN or infinite"):
        validate_dataset(data, None, batch_size=1)


@FAST
@given(arrays(), st.booleans())
def test_range_is_enforced_for_bounded_likelihoods(x, in_test):
    outside = bool((x < 0).any() or (x > 1).any())
    data = _dataset(np.clip(x, 0, 1), x) if in_test else _dataset(x, np.clip(x[:1], 0, 1))
    if outside:
        with pytest.raises(UserInputError, match=r"\[0, 1\]"):
            validate_dataset(data, (0.0, 1.0), batch_size=1)
    else:
        validate_dataset(data, (0.0, 1.0), batch_size=1)
    validate_dataset(data, None, batch_size=1)  # any finite values suit an unbounded likelihood


@FAST
@given(arrays(), st.integers(1, 40))
def test_valid_data_passes_iff_enough_examples(x, batch_size):
    unit = (np.abs(x) / (1 + np.abs(x))).astype(np.float32)  # squashed into [0, 1)
    data = _dataset(unit)
    if len(unit) < batch_size:
        with pytest.raises(UserInputError, match="--batch-size"):
            validate_dataset(data, (0.0, 1.0), batch_size)
    else:
        validate_dataset(data, (0.0, 1.0), batch_size)
