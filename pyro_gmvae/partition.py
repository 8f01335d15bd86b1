"""Partitions of the latent means and seating the mixture on one (steps 2 and 3 of ``--init``).

:func:`partition_latents` clusters q(x|y)'s means: k-means on the means themselves
(``vae-kmeans``), or k-means on a UMAP embedding of them (``vae-umap``, N2D's recipe,
McConville et al. 2020), which follows curved manifolds a Gaussian cluster cannot.
:func:`seat_components` then puts the K components of p(x | z, w) on the clusters.
"""

from __future__ import annotations

import numpy as np
import torch

from pyro_gmvae.errors import UserInputError
from pyro_gmvae.metrics import contingency
from pyro_gmvae.networks import SCALE_FLOOR
from pyro_gmvae.progress import status

UMAP_DIM = 10  # N2D's embedding size; enough to keep MNIST's ten manifolds apart
UMAP_NEIGHBOURS = 15


def _inverse_softplus(t: torch.Tensor) -> torch.Tensor:
    return t + torch.log(-torch.expm1(-t))  # log(exp(t) - 1), stable for large t


def _umap_embedding(points, seed: int):
    try:
        import umap
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserInputError("--init vae-umap needs umap-learn: pip install umap-learn") from None
    import warnings

    reducer = umap.UMAP(
        n_components=UMAP_DIM,
        n_neighbors=min(UMAP_NEIGHBOURS, len(points) - 1),
        min_dist=0.0,
        random_state=seed,
        n_jobs=1,
    )
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():  # "n_jobs overridden by random_state" and friends
            warnings.simplefilter("ignore")
            return reducer.fit_transform(points)
    finally:
        # numba's first start widens torch's OpenMP pool to every core: the rest of the run
        # (and a caller's later runs) would train with another thread count, which changes
        # float32 sums, so the same seed would give other numbers after the first partition.
        torch.set_num_threads(threads)


def partition_latents(
    loc: torch.Tensor, num_clusters: int, seed: int, method: str = "kmeans", progress: bool = False
) -> dict:
    """Partition latent means ``loc`` (N, Dx) into ``num_clusters`` clusters.

    ``method``: ``"kmeans"`` (k-means on ``loc``, 10 restarts) or ``"umap"`` (k-means on a
    :data:`UMAP_DIM`-dimensional UMAP embedding of ``loc``, min_dist 0, seeded, one thread,
    so the same seed gives the same partition).  Returns ``labels`` (N,) int64 and
    ``inertia``, the k-means objective in the space it ran in.  With ``progress`` each
    step shows a status line (the UMAP embedding alone takes most of a minute on MNIST).
    """
    from sklearn.cluster import KMeans

    if len(loc) < num_clusters:
        raise UserInputError(f"--init needs at least K={num_clusters} training examples to cluster, got {len(loc)}")
    points = loc.double().cpu().numpy()
    if method == "umap":
        if len(loc) <= UMAP_DIM + 1:
            raise UserInputError(f"--init vae-umap needs more than {UMAP_DIM + 1} training examples, got {len(loc)}")
        with status(f"partition: UMAP embedding of {len(loc)} latent means", progress):  # with umap's import
            points = _umap_embedding(points, seed)
    elif method != "kmeans":
        raise ValueError(f"unknown partition method {method!r}")
    space = "embedded" if method == "umap" else "latent"
    where = f"partition: k-means (K={num_clusters}, 10 restarts) of {len(points)} {space} means"
    with status(where, progress):
        kmeans = KMeans(num_clusters, n_init=10, random_state=seed).fit(points)
    return {"labels": torch.as_tensor(kmeans.labels_, dtype=torch.long), "inertia": float(kmeans.inertia_)}


def consensus_scores(partitions: list[torch.Tensor]) -> list[float]:
    """Each partition's mean adjusted Rand index with the others (all of the same examples).

    The start whose partition scores highest is the most typical of the R: with starts that
    scatter around one partition and a few outliers, it is the one nearest the middle.
    """
    from sklearn.metrics import adjusted_rand_score

    labels = [np.asarray(p.cpu()) for p in partitions]
    r = len(labels)
    if r < 2:
        return [1.0] * r
    ari = np.eye(r)
    for i in range(r):
        for j in range(i + 1, r):
            ari[i, j] = ari[j, i] = adjusted_rand_score(labels[i], labels[j])
    return [float((ari[i].sum() - 1.0) / (r - 1)) for i in range(r)]


def number_by_labels(assignments: torch.Tensor, indices: torch.Tensor, classes: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber the clusters of ``assignments`` (N,) so that cluster c best matches class c.

    The matching maximises how many of the labelled examples (``indices`` into the
    partitioned examples, with ``classes``) land in the cluster of their class (Hungarian
    assignment on their counts); labelled examples beyond the partitioned ones are ignored.
    """
    from scipy.optimize import linear_sum_assignment

    inside = indices < len(assignments)
    clusters, labels = assignments.cpu()[indices[inside].cpu()], classes[inside.to(classes.device)].cpu()
    rows, cols = linear_sum_assignment(contingency(clusters, labels, k, k), maximize=True)
    new_id = torch.empty(k, dtype=torch.long)
    new_id[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return new_id[assignments.cpu()]


@torch.no_grad()
def seat_components(
    model,
    guide,
    x_train: torch.Tensor,
    seed: int,
    max_points: int = 20000,
    shrink: float = 0.1,
    method: str = "kmeans",
    progress: bool = False,
    anchors: tuple[torch.Tensor, torch.Tensor] | None = None,
    weights: bool = False,
):
    """Put the K components of p(x | z, w) on a partition of q(x|y)'s means.

    Parameters
    ----------
    model, guide
        A GMVAE and its guide; the guide's ``encoder`` gives q(x | y).
    x_train : Tensor
        Training examples; the first ``max_points`` are encoded and partitioned.
    seed : int
        Seed of the partition (k-means, UMAP).
    shrink : float
        Factor on the prior network's head weights, so that mu_k(w) and sigma_k(w) start
        close to the seated values for any w.
    method : str
        ``"kmeans"`` or ``"umap"``, see :func:`partition_latents`.
    progress : bool
        Show a status line for each step of the partition.
    anchors : (indices, classes), optional
        ``--labels``: the labelled examples (indices into ``x_train``) and their classes.
        The partition's cluster ids are then renumbered so that cluster c holds class c
        (:func:`number_by_labels`), the order the observed z of those examples asks for.
    weights : bool
        Also set the cluster weights pi to the partition's cluster proportions (as a
        Gaussian mixture started from k-means is); False keeps the prior's pi.

    Returns
    -------
    dict
        ``assignments`` (cluster of each partitioned example, int64 tensor on the CPU),
        ``inertia`` (k-means objective).
    """
    num_clusters = model.prior.num_clusters
    guide.eval()
    y = x_train[:max_points]
    q = [guide.encode(y[i : i + 1000]) for i in range(0, len(y), 1000)]
    loc = torch.cat([b["x_loc"] for b in q])
    var = torch.cat([b["x_scale"] for b in q]) ** 2
    partition = partition_latents(loc, num_clusters, seed, method, progress)
    if anchors is not None:
        partition["labels"] = number_by_labels(partition["labels"], *anchors, num_clusters)
    labels = partition["labels"].to(loc.device)
    onehot = torch.nn.functional.one_hot(labels, num_clusters).to(loc.dtype)  # (N, K)
    counts = onehot.sum(0)[:, None]  # (K, 1); k-means leaves no cluster empty
    centroids = onehot.T @ loc / counts  # (K, Dx)
    # Spread of x ~ q within the cluster: variance of the means plus the mean variance.
    spread = onehot.T @ (loc**2 + var) / counts - centroids**2
    scale = spread.clamp_min(4 * SCALE_FLOOR**2).sqrt()
    if weights:
        model.prior.set_cluster_weights(counts[:, 0] / len(labels))

    # q(w | y) starts at the prior N(0, I): w carries nothing yet and costs no KL, so the
    # first GMVAE steps do not pull the pretrained trunk towards a random w-path.
    encoder = guide.encoder
    encoder.w_loc.weight.zero_()
    encoder.w_loc.bias.zero_()
    encoder.w_scale.weight.zero_()
    encoder.w_scale.bias.fill_(float(_inverse_softplus(torch.tensor(1.0 - SCALE_FLOOR))))

    network = model.prior.network
    network.loc_head.weight.mul_(shrink)
    network.loc_head.bias.copy_(centroids.reshape(-1))
    network.scale_head.weight.mul_(shrink)
    network.scale_head.bias.copy_(_inverse_softplus(scale - SCALE_FLOOR).reshape(-1))
    return {"assignments": partition["labels"], "inertia": partition["inertia"]}
