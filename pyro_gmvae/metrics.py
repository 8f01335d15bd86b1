"""Clustering metrics on a test split: the paper's accuracy rule (each cluster takes the label
of its most confident example), Hungarian accuracy (the best one-to-one matching of clusters
to labels), purity, NMI, ARI, the clusters used and the entropy of their sizes.

All functions take numpy-compatible arrays: ``assignments`` (N,) cluster indices,
``labels`` (N,) true classes, ``probs`` (N, K) cluster probabilities.
"""

from __future__ import annotations

import numpy as np


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def contingency(assignments, labels, num_clusters: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """Counts ``table[k, c]`` of examples in cluster k with label c."""
    a, y = _np(assignments).astype(np.int64), _np(labels).astype(np.int64)
    num_clusters = max(num_clusters or 0, int(a.max(initial=-1)) + 1)
    num_classes = max(num_classes or 0, int(y.max(initial=-1)) + 1)
    table = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(table, (a, y), 1)
    return table


def paper_accuracy(probs, labels) -> float:
    """The paper's rule (the AAE criterion): each cluster takes the label of its single
    most confident example, then examples take their cluster's label (many-to-one)."""
    p, y = _np(probs), _np(labels)
    cluster_label = y[p.argmax(0)]  # (K,): label of the example with the highest p[:, k]
    return float((cluster_label[p.argmax(1)] == y).mean())


def hungarian_accuracy(assignments, labels) -> float:
    """Best one-to-one matching of clusters to classes (unmatched clusters count as wrong)."""
    from scipy.optimize import linear_sum_assignment  # lazy: scipy/sklearn double the CLI's start-up time

    table = contingency(assignments, labels)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def confusions(assignments, labels, top: int = 5) -> list[tuple[int, int, int]]:
    """The largest errors under the Hungarian matching: ``(count, label, matched_label)`` for
    the examples of class ``label`` that sit in the cluster matched to ``matched_label``,
    largest first, at most ``top`` of them (clusters left unmatched are not counted)."""
    from scipy.optimize import linear_sum_assignment

    table = contingency(assignments, labels)
    rows, cols = linear_sum_assignment(table, maximize=True)
    errors = [
        (int(table[k, c]), c, int(matched))
        for k, matched in zip(rows, cols, strict=True)
        for c in range(table.shape[1])
        if c != matched and table[k, c] > 0
    ]
    return sorted(errors, key=lambda e: (-e[0], e[1], e[2]))[:top]


def purity(assignments, labels) -> float:
    """Fraction of examples carrying their cluster's majority label (many-to-one)."""
    table = contingency(assignments, labels)
    return float(table.max(1).sum() / table.sum())


def clusters_used(assignments) -> int:
    """Number of non-empty clusters."""
    return int(np.unique(_np(assignments)).size)


def marginal_entropy(assignments, num_clusters: int) -> float:
    """Entropy (nats) of the empirical cluster marginal; log K when all are used equally."""
    counts = np.bincount(_np(assignments).astype(np.int64), minlength=num_clusters).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def clustering_metrics(probs, labels=None) -> dict:
    """Every metric of the module docstring from cluster probabilities (N, K).

    Without labels only ``clusters_used`` and ``marginal_entropy`` are returned.
    """
    p = _np(probs)
    assignments = p.argmax(1)
    out = {"clusters_used": clusters_used(assignments), "marginal_entropy": marginal_entropy(assignments, p.shape[1])}
    if labels is not None:
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score  # lazy, see above

        y = _np(labels)
        out.update(
            acc_paper=paper_accuracy(p, y),
            acc_hungarian=hungarian_accuracy(assignments, y),
            purity=purity(assignments, y),
            nmi=float(normalized_mutual_info_score(y, assignments)),
            ari=float(adjusted_rand_score(y, assignments)),
        )
    return out
