"""Initialising the mixture from a pretrained VAE (``--init vae-kmeans``).

The recipe of VaDE (Jiang et al. 2017), adapted to the GMVAE:

1. pretrain the x-path alone, encoder trunk, q(x|y) heads and decoder, as a plain VAE with
   p(x) = N(0, I) (:func:`pretrain_vae`);
2. cluster the posterior means of x for the training set with k-means;
3. seat the K components of p(x | z, w) on the k-means clusters: each component's location
   becomes its cluster's centroid and its scale the cluster's spread of x under q
   (the moment-matched Gaussian), while the prior network's weights are shrunk so that w
   starts with little influence, and q(w | y) is set to the prior N(0, I)
   (:func:`seat_components`).

With ``--init-restarts R`` (R > 1) this is done R times, each with its own network
initialisation, data order and k-means seed; each seated start then trains a copy of
itself for ``--init-probe-epochs`` GMVAE epochs (:func:`probe_start`) and is scored by the
training objective on a fixed set of training examples.  The start (the seated state, not
the probed copy) with the lowest objective is kept.  No labels are used: like k-means'
own restarts, the restarts are ranked by the objective being optimised.

Training then proceeds as usual from this start.  The v1 guide's cluster head q(z | y) is
not fitted to the k-means partition: it starts from PyTorch's initialisation.  The default
(``--init random``) skips all of this and uses PyTorch's initialisation throughout.
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

INITS = ("random", "vae-kmeans")


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


@torch.no_grad()
def seat_components(model, guide, x_train: torch.Tensor, seed: int, max_points: int = 20000, shrink: float = 0.1):
    """Put the K components of p(x | z, w) on the k-means clusters of q(x|y)'s means.

    Parameters
    ----------
    model, guide
        A GMVAE and its guide; the guide's ``encoder`` gives q(x | y).
    x_train : Tensor
        Training examples; the first ``max_points`` are encoded and clustered.
    seed : int
        k-means seed.
    shrink : float
        Factor on the prior network's head weights, so that mu_k(w) and sigma_k(w) start
        close to the seated values for any w.

    Returns
    -------
    dict
        ``assignments`` (k-means cluster of each clustered example, int64 tensor),
        ``inertia`` (k-means objective).
    """
    from sklearn.cluster import KMeans

    num_clusters = model.prior.num_clusters
    guide.eval()
    y = x_train[:max_points]
    q = [guide.encode(y[i : i + 1000]) for i in range(0, len(y), 1000)]
    loc = torch.cat([b["x_loc"] for b in q])
    var = torch.cat([b["x_scale"] for b in q]) ** 2
    if len(loc) < num_clusters:
        raise UserInputError(f"--init vae-kmeans needs at least K={num_clusters} training examples, got {len(loc)}")
    kmeans = KMeans(num_clusters, n_init=10, random_state=seed).fit(loc.double().cpu().numpy())
    labels = torch.as_tensor(kmeans.labels_, dtype=torch.long, device=loc.device)
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
    return {"assignments": labels.cpu(), "inertia": float(kmeans.inertia_)}


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
