"""Clustering metrics on hand-made cases: perfect and known confusions, permutation
invariance, and more clusters than classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_gmvae.metrics import (
    clustering_metrics,
    clusters_used,
    confusions,
    contingency,
    hungarian_accuracy,
    marginal_entropy,
    paper_accuracy,
    purity,
)


def one_hot_probs(assignments, num_clusters, confidence=None):
    """Probabilities peaked on ``assignments``; ``confidence`` (N,) sets the peak height so
    that the paper rule's "most confident example" is chosen by hand."""
    a = np.asarray(assignments)
    conf = np.full(len(a), 0.9) if confidence is None else np.asarray(confidence, dtype=float)
    p = np.tile(((1 - conf) / (num_clusters - 1))[:, None], (1, num_clusters))
    p[np.arange(len(a)), a] = conf
    return p


def test_contingency_counts():
    table = contingency([0, 0, 1, 2], [1, 1, 0, 1])
    np.testing.assert_array_equal(table, [[0, 2], [1, 0], [0, 1]])


def test_perfect_clustering_scores_one_under_relabelling():
    labels = np.repeat(np.arange(4), 5)
    assignments = np.array([2, 0, 3, 1])[labels]  # same partition, other cluster ids
    probs = one_hot_probs(assignments, 4)
    m = clustering_metrics(probs, labels)
    for key in ("acc_paper", "acc_hungarian", "purity", "nmi", "ari"):
        assert m[key] == pytest.approx(1.0), key
    assert m["clusters_used"] == 4
    assert m["marginal_entropy"] == pytest.approx(math.log(4))


def test_known_confusion_hand_computed():
    # clusters x classes contingency [[3, 1], [1, 3]]
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    assignments = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert hungarian_accuracy(assignments, labels) == pytest.approx(6 / 8)
    assert purity(assignments, labels) == pytest.approx(6 / 8)
    m = clustering_metrics(one_hot_probs(assignments, 2), labels)
    # ARI: sum C(n_ij,2) = 6, rows and columns each sum to 12, C(8,2) = 28:
    # (6 - 12*12/28) / (12 - 12*12/28) = (6/7) / (48/7) = 1/8
    assert m["ari"] == pytest.approx(0.125)
    # NMI (arithmetic mean normalisation): MI / log 2 with both marginals uniform
    mi = 2 * (3 / 8) * math.log((3 / 8) / (1 / 4)) + 2 * (1 / 8) * math.log((1 / 8) / (1 / 4))
    assert m["nmi"] == pytest.approx(mi / math.log(2))


def test_paper_rule_uses_the_most_confident_example():
    """Cluster 0 holds labels (0, 0, 1) but its most confident member has label 1, so the
    paper rule names it 1 (accuracy 1/3 there), while purity names it 0."""
    labels = np.array([0, 0, 1, 1, 1])
    assignments = np.array([0, 0, 0, 1, 1])
    confidence = np.array([0.6, 0.7, 0.95, 0.8, 0.9])
    probs = one_hot_probs(assignments, 2, confidence)
    # cluster 0 -> label 1 (example 2), cluster 1 -> label 1 (example 4): 3 of 5 right
    assert paper_accuracy(probs, labels) == pytest.approx(3 / 5)
    assert purity(assignments, labels) == pytest.approx(4 / 5)
    assert hungarian_accuracy(assignments, labels) == pytest.approx(4 / 5)


def test_more_clusters_than_classes():
    """K = 4 clusters splitting 2 classes cleanly: many-to-one metrics give 1, the one-to-one
    Hungarian match leaves two clusters unmatched and counts them wrong."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assignments = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = one_hot_probs(assignments, 6)  # two more clusters that nobody uses
    m = clustering_metrics(probs, labels)
    assert m["acc_paper"] == pytest.approx(1.0)
    assert m["purity"] == pytest.approx(1.0)
    assert m["acc_hungarian"] == pytest.approx(0.5)
    assert m["clusters_used"] == 4
    assert m["marginal_entropy"] == pytest.approx(math.log(4))
    assert m["nmi"] < 1.0


def test_metrics_are_invariant_to_permuting_clusters_and_examples():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=200)
    # a noisy clustering: 70% follow the label through a fixed map, the rest random
    assignments = np.where(rng.random(200) < 0.7, (labels * 3) % 7, rng.integers(0, 7, size=200))
    probs = one_hot_probs(assignments, 7, confidence=rng.uniform(0.3, 0.99, size=200))
    reference = clustering_metrics(probs, labels)
    cluster_perm = rng.permutation(7)
    example_perm = rng.permutation(200)
    permuted = clustering_metrics(probs[:, cluster_perm][example_perm], labels[example_perm])
    for key, value in reference.items():
        assert permuted[key] == pytest.approx(value), key
    assert 0 < reference["acc_hungarian"] < 1
    assert reference["purity"] >= reference["acc_hungarian"]  # many-to-one >= one-to-one


def test_clusters_used_and_entropy():
    assert clusters_used([3, 3, 1]) == 2
    assert marginal_entropy([0, 0, 0, 0], 5) == pytest.approx(0.0)
    assert marginal_entropy([0, 1, 2, 3, 4], 5) == pytest.approx(math.log(5))
    p = np.array([3, 1]) / 4
    assert marginal_entropy([0, 0, 0, 2], 3) == pytest.approx(-(p * np.log(p)).sum())


def test_without_labels_and_with_tensors():
    probs = torch.softmax(torch.randn(30, 4), -1)
    m = clustering_metrics(probs)
    assert set(m) == {"clusters_used", "marginal_entropy"}
    labelled = clustering_metrics(probs, torch.randint(0, 3, (30,)))
    assert {"acc_paper", "acc_hungarian", "purity", "nmi", "ari"} <= set(labelled)


def test_confusions_list_the_largest_errors_under_the_matching():
    # Clusters 0, 1, 2 hold classes 2, 0, 1 mostly; cluster 3 is left unmatched (K > classes).
    table = np.array([[1, 4, 20], [15, 0, 3], [2, 12, 0], [5, 5, 5]])  # clusters x classes
    assignments = np.repeat(np.arange(4), table.sum(1))
    labels = np.concatenate([np.repeat(np.arange(3), row) for row in table])
    assert confusions(assignments, labels) == [(4, 1, 2), (3, 2, 0), (2, 0, 1), (1, 0, 2)]
    assert confusions(assignments, labels, top=1) == [(4, 1, 2)]
    perfect = np.repeat(np.arange(3), 4)
    assert confusions((perfect + 1) % 3, perfect) == []
