"""Initialising the mixture from a pretrained VAE (``--init vae-kmeans`` or ``vae-umap``).

The recipe of VaDE (Jiang et al. 2017), adapted to the GMVAE:

1. pretrain the x-path alone, encoder trunk, q(x|y) heads and decoder, as a plain VAE with
   p(x) = N(0, I) (:func:`pretrain_vae`);
2. partition the posterior means of x for the training set into K clusters
   (:func:`partition_latents`): k-means on the means themselves (``vae-kmeans``), or
   k-means on a 10-dimensional UMAP embedding of them (``vae-umap``, the recipe of N2D,
   McConville et al. 2020), which follows the curved manifolds a Gaussian cluster cannot;
3. seat the K components of p(x | z, w) on the clusters: each component's location
   becomes its cluster's centroid and its scale the cluster's spread of x under q
   (the moment-matched Gaussian), while the prior network's weights are shrunk so that w
   starts with little influence, and q(w | y) is set to the prior N(0, I)
   (:func:`seat_components`);
4. with ``--init-fit-epochs F`` (F > 0), fit the seated GMVAE to the partition for F epochs
   over the clustered examples: the GMVAE objective plus ``--init-fit-weight`` times the
   cross-entropy between the model's cluster posterior and the cluster of each example
   (:func:`fit_to_partition`).  Seating alone moves a curved UMAP cluster into one
   Gaussian badly; the fit reshapes q(x | y) so that the mixture holds the partition.

With ``--init-restarts R`` (R > 1) this is done R times, each with its own network
initialisation, data order and clustering seed; each start then trains a copy of itself
for ``--init-probe-epochs`` GMVAE epochs (:func:`probe_start`) and is scored by the
training objective on a fixed set of training examples.  The start (the state before the
probe, not the probed copy) with the lowest objective is kept.  No labels are used
anywhere: like k-means' own restarts, the restarts are ranked by the objective being
optimised, and the partition comes from the data alone.

Training then proceeds as usual from this start, with the plain GMVAE objective.  Without
the fit, the v1 guide's cluster head q(z | y) is not fitted to the partition: it starts
from PyTorch's initialisation.  The default (``--init random``) skips all of this and uses
PyTorch's initialisation throughout.
"""

from __future__ import annotations

import copy
import math

import torch
from pyro import distributions as dist
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from pyro_gmvae.errors import UserInputError
from pyro_gmvae.networks import SCALE_FLOOR
from pyro_gmvae.objective import make_elbo
from pyro_gmvae.posterior import elbo_terms_dataset

INITS = ("random", "vae-kmeans", "vae-umap")
# How each --init partitions the latent means (the clustering of step 2 above).
PARTITIONS = {"vae-kmeans": "kmeans", "vae-umap": "umap"}
UMAP_DIM = 10  # N2D's embedding size; enough to keep MNIST's ten manifolds apart
UMAP_NEIGHBOURS = 15


def _epoch_batches(x_train: torch.Tensor, batch_size: int, generator: torch.Generator):
    """One epoch of minibatches in the order ``generator`` shuffles; the ragged last batch is
    dropped (BatchNorm needs more than one example)."""
    perm = torch.randperm(len(x_train), generator=generator).to(x_train.device)
    for step in range(len(x_train) // batch_size):
        yield x_train[perm[step * batch_size : (step + 1) * batch_size]]


def pretrain_vae(
    model,
    guide,
    x_train: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: bool = False,
) -> list[float]:
    """Train the encoder's x-path and the decoder as a VAE with p(x) = N(0, I).

    The w-path, the prior network and the cluster head (v1) are untouched.  Uses its own
    Adam optimiser; shuffles with ``generator``.  Returns the mean loss (negative ELBO of
    the plain VAE, nats per example) of each epoch.
    """
    encoder = guide.encoder
    params = [
        *encoder.trunk.parameters(),
        *encoder.x_loc.parameters(),
        *encoder.x_scale.parameters(),
        *model.decoder.parameters(),
        *model.likelihood.parameters(),
    ]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    guide.train()
    steps = len(x_train) // batch_size
    losses = []
    bar = tqdm(total=epochs * steps, disable=not progress, desc="VAE pretraining", unit="step", mininterval=0.5)
    for _ in range(epochs):
        total = torch.zeros((), device=x_train.device)
        for y in _epoch_batches(x_train, batch_size, generator):
            q = encoder(y)
            q_x = dist.Normal(q["x_loc"], q["x_scale"]).to_event(1)
            x = q_x.rsample()
            p_x = dist.Normal(torch.zeros_like(x), 1.0).to_event(1)
            elbo = model.p_y(x).log_prob(y) - kl_divergence(q_x, p_x)
            loss = -elbo.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach()
            bar.update()
        losses.append(total.item() / steps)
    bar.close()
    return losses


def _inverse_softplus(t: torch.Tensor) -> torch.Tensor:
    return t + torch.log(-torch.expm1(-t))  # log(exp(t) - 1), stable for large t


def partition_latents(loc: torch.Tensor, num_clusters: int, seed: int, method: str = "kmeans") -> dict:
    """Partition latent means ``loc`` (N, Dx) into ``num_clusters`` clusters.

    ``method``: ``"kmeans"`` (k-means on ``loc``, 10 restarts) or ``"umap"`` (k-means on a
    :data:`UMAP_DIM`-dimensional UMAP embedding of ``loc``, min_dist 0, seeded, one thread,
    so the same seed gives the same partition).  Returns ``labels`` (N,) int64 and
    ``inertia``, the k-means objective in the space it ran in.
    """
    from sklearn.cluster import KMeans

    if len(loc) < num_clusters:
        raise UserInputError(f"--init needs at least K={num_clusters} training examples to cluster, got {len(loc)}")
    points = loc.double().cpu().numpy()
    if method == "umap":
        if len(loc) <= UMAP_DIM + 1:
            raise UserInputError(f"--init vae-umap needs more than {UMAP_DIM + 1} training examples, got {len(loc)}")
        try:
            import umap
        except ImportError:  # pragma: no cover - a declared dependency
            raise UserInputError("--init vae-umap needs umap-learn: pip install umap-learn") from None
        import warnings

        reducer = umap.UMAP(
            n_components=UMAP_DIM,
            n_neighbors=min(UMAP_NEIGHBOURS, len(loc) - 1),
            min_dist=0.0,
            random_state=seed,
            n_jobs=1,
        )
        with warnings.catch_warnings():  # "n_jobs overridden by random_state" and friends
            warnings.simplefilter("ignore")
            points = reducer.fit_transform(points)
    elif method != "kmeans":
        raise ValueError(f"unknown partition method {method!r}")
    kmeans = KMeans(num_clusters, n_init=10, random_state=seed).fit(points)
    return {"labels": torch.as_tensor(kmeans.labels_, dtype=torch.long), "inertia": float(kmeans.inertia_)}


@torch.no_grad()
def seat_components(
    model,
    guide,
    x_train: torch.Tensor,
    seed: int,
    max_points: int = 20000,
    shrink: float = 0.1,
    method: str = "kmeans",
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
    partition = partition_latents(loc, num_clusters, seed, method)
    labels = partition["labels"].to(loc.device)
    onehot = torch.nn.functional.one_hot(labels, num_clusters).to(loc.dtype)  # (N, K)
    counts = onehot.sum(0)[:, None]  # (K, 1); k-means leaves no cluster empty
    centroids = onehot.T @ loc / counts  # (K, Dx)
    # Spread of x ~ q within the cluster: variance of the means plus the mean variance.
    spread = onehot.T @ (loc**2 + var) / counts - centroids**2
    scale = spread.clamp_min(4 * SCALE_FLOOR**2).sqrt()

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


def cluster_log_probs(model, guide, q: dict[str, torch.Tensor]) -> torch.Tensor:
    """The cluster posterior the model assigns with, differentiable, shape (B, K).

    v2 guide: log p(z | x, w) at the posterior means of q(x|y) and q(w|y); v1 guide: the
    cluster head's log q(z | y).  ``q`` is the output of ``guide.encode``.
    """
    if guide.cluster_posterior == "guide":
        return torch.log_softmax(q["z_logits"], -1)
    return model.cluster_log_posterior(q["x_loc"], q["w_loc"])


def fit_to_partition(
    model,
    guide,
    x_points: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    weight: float,
    num_particles: int,
    generator: torch.Generator,
    progress: bool = False,
) -> dict:
    """Train the whole GMVAE on its objective plus ``weight`` x the cross-entropy to ``labels``.

    ``x_points`` (N, ...) are the partitioned examples and ``labels`` (N,) their clusters.
    Uses its own Adam optimiser at ``lr`` and shuffles with ``generator``; a batch size
    above N is lowered to N.  Returns the mean loss (the GMVAE objective, nats per example)
    and the mean cross-entropy of each epoch.
    """
    batch_size = min(batch_size, len(x_points))  # --batch-size may exceed the 20,000 partitioned
    loss_fn = make_elbo(num_particles)(model, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=lr)
    model.train()
    guide.train()
    labels = labels.to(x_points.device)
    steps = len(x_points) // batch_size
    record = {"loss": [], "cross_entropy": []}
    bar = tqdm(total=epochs * steps, disable=not progress, desc="fit to the partition", unit="step", mininterval=0.5)
    for _ in range(epochs):
        totals = torch.zeros(2, device=x_points.device)
        for idx in _epoch_batches(torch.arange(len(x_points), device=x_points.device), batch_size, generator):
            y = x_points[idx]
            elbo_loss = loss_fn(y) / len(y)
            cross_entropy = torch.nn.functional.nll_loss(cluster_log_probs(model, guide, guide.encode(y)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            (elbo_loss + weight * cross_entropy).backward()
            optimizer.step()
            totals += torch.stack([elbo_loss.detach(), cross_entropy.detach()])
            bar.update()
        record["loss"].append(totals[0].item() / steps)
        record["cross_entropy"].append(totals[1].item() / steps)
    bar.close()
    return record


def probe_start(
    model,
    guide,
    x_train: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    num_particles: int,
    generator: torch.Generator,
    score_points: int = 10000,
    progress: bool = False,
) -> dict:
    """Train a copy of a seated GMVAE for ``epochs`` and score it; ``model`` and ``guide`` are untouched.

    The copy trains with the full objective (no KL warm-up) and a fresh Adam at ``lr``.
    Returns ``loss``, the mean training objective per example (nats, lower is better) on
    the first ``score_points`` training examples after the probe, and ``cluster_entropy``,
    the mean entropy of r(z) = p(z | x, w) there.  A probe that diverges scores ``inf``.
    """
    model, guide = copy.deepcopy(model), copy.deepcopy(guide)
    loss_fn = make_elbo(num_particles)(model, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=lr)
    model.train()
    guide.train()
    steps = len(x_train) // batch_size
    bar = tqdm(total=epochs * steps, disable=not progress, desc="probe of a start", unit="step", mininterval=0.5)
    try:
        for _ in range(epochs):
            for y in _epoch_batches(x_train, batch_size, generator):
                loss = loss_fn(y) / batch_size
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
        terms = elbo_terms_dataset(model, guide, x_train[:score_points], num_particles)
    except ValueError as err:  # Pyro's validation of NaN parameters: the probe diverged
        if "found invalid values" not in str(err):
            raise
        return {"loss": math.inf, "cluster_entropy": math.nan}
    finally:
        bar.close()
    score = float(terms["loss"].mean())
    return {"loss": score if math.isfinite(score) else math.inf, "cluster_entropy": float(terms["cv"].mean())}
