"""Initialising the mixture from a pretrained VAE (``--init vae-kmeans`` or ``vae-umap``).

The recipe of VaDE (Jiang et al. 2017), adapted to the GMVAE:

1. pretrain the x-path alone, encoder trunk, q(x|y) heads and decoder, as a plain VAE with
   p(x) = N(0, I) (:func:`pretrain_vae`);
2. partition the posterior means of x for the training set into K clusters
   (:func:`~pyro_gmvae.partition.partition_latents`): k-means on the means themselves (``vae-kmeans``), or
   k-means on a 10-dimensional UMAP embedding of them (``vae-umap``, the recipe of N2D,
   McConville et al. 2020), which follows the curved manifolds a Gaussian cluster cannot;
3. seat the K components of p(x | z, w) on the clusters: each component's location
   becomes its cluster's centroid and its scale the cluster's spread of x under q
   (the moment-matched Gaussian), while the prior network's weights are shrunk so that w
   starts with little influence, and q(w | y) is set to the prior N(0, I)
   (:func:`~pyro_gmvae.partition.seat_components`); with ``--init-weights partition`` the
   cluster weights pi become the partition's cluster proportions;
4. with ``--init-fit-epochs F`` (F > 0), fit the seated GMVAE to the partition for F epochs
   over the clustered examples: the GMVAE objective plus ``--init-fit-weight`` times the
   cross-entropy between the model's cluster posterior and the cluster of each example
   (:func:`fit_to_partition`).  Seating alone moves a curved UMAP cluster into one
   Gaussian badly; the fit reshapes q(x | y) so that the mixture holds the partition.

With ``--init-restarts R`` (R > 1) this is done R times, each with its own network
initialisation, data order and clustering seed; each start then trains a copy of itself
for ``--init-probe-epochs`` GMVAE epochs (:func:`probe_start`) and is scored by the
training objective on a fixed set of training examples.  The start (the state before the
probe, not the probed copy) with the lowest objective is kept.  With ``--init-select
consensus`` there is no probe: the start whose partition has the highest mean adjusted Rand
index with the other starts' partitions is kept (the most typical of the R partitions;
:func:`~pyro_gmvae.partition.consensus_scores`).  No labels are used anywhere: like k-means'
own restarts, the restarts are ranked by the objective being optimised or by their
agreement, and the partition comes from the data alone.

Training then proceeds as usual from this start, with the plain GMVAE objective.  Without
the fit, the v1 guide's cluster head q(z | y) is not fitted to the partition: it starts
from PyTorch's initialisation.  The default (``--init random``) skips all of this and uses
PyTorch's initialisation throughout.  :func:`initialize` runs the recipe for
:func:`~pyro_gmvae.training.train`; every optimisation here goes through
:func:`~pyro_gmvae.loop.run_epoch`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import TYPE_CHECKING

import torch
from pyro import distributions as dist
from torch.distributions import kl_divergence

from pyro_gmvae import posterior
from pyro_gmvae.errors import NonFiniteLossError
from pyro_gmvae.loop import adam, is_invalid_values_error, progress_bar, run_epoch
from pyro_gmvae.objective import make_elbo
from pyro_gmvae.partition import consensus_scores, partition_latents, seat_components
from pyro_gmvae.progress import status

if TYPE_CHECKING:
    from pyro_gmvae.config import Config
    from pyro_gmvae.data import Dataset

logger = logging.getLogger(__name__)

# How each --init partitions the latent means (the clustering of step 2 above).
PARTITIONS = {"vae-kmeans": "kmeans", "vae-umap": "umap"}
__all__ = ["PARTITIONS", "fit_to_partition", "initialize", "partition_latents", "pretrain_vae", "probe_start"]
__all__ += ["seat_components"]


def pretrain_vae(
    model,
    guide,
    x_train: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: bool = False,
    adam_kernel: str = "auto",
) -> list[float]:
    """Train the encoder's x-path and the decoder as a VAE with p(x) = N(0, I).

    The w-path, the prior network and the cluster head (v1) are untouched.  Uses its own
    Adam optimiser (``adam_kernel``: see :func:`pyro_gmvae.loop.adam`); shuffles with
    ``generator``.  Returns the mean loss (negative ELBO of the plain VAE, nats per
    example) of each epoch.
    """
    encoder = guide.encoder
    params = [
        *encoder.trunk.parameters(),
        *encoder.x_loc.parameters(),
        *encoder.x_scale.parameters(),
        *model.decoder.parameters(),
        *model.likelihood.parameters(),
    ]
    optimizer = adam(params, lr, adam_kernel)

    def vae_loss(y: torch.Tensor) -> torch.Tensor:
        q = encoder(y)
        q_x = dist.Normal(q["x_loc"], q["x_scale"]).to_event(1)
        x = q_x.rsample()
        p_x = dist.Normal(torch.zeros_like(x), 1.0).to_event(1)
        return -(model.p_y(x).log_prob(y) - kl_divergence(q_x, p_x)).mean()

    model.train()
    guide.train()
    steps = len(x_train) // batch_size
    bar = progress_bar(epochs * steps, "VAE pretraining", progress)
    losses = []
    for epoch in range(1, epochs + 1):
        total = run_epoch(
            vae_loss, optimizer, x_train, batch_size, generator, bar=bar, epoch=epoch, explain=_hint("VAE pretraining")
        )
        losses.append(total.item() / steps)
    bar.close()
    return losses


def _hint(what: str):
    return lambda y: f"{what} diverged; lower --pretrain-lr"


class PartitionTerm:
    """``(y, idx) -> `` the mean cross-entropy of the guide's cluster posterior r(z | y) (at
    the posterior means) to the partition ``labels`` over the batch's partitioned examples.

    ``labels`` (N,) are the clusters of the first N examples of the array of ``size``
    examples that ``idx`` indexes (``None``: N, every example partitioned); a batch holding
    none of them gives 0.  The fit's term (:func:`fit_to_partition`) and
    ``--init-anchor-epochs``' (the same term kept, with a falling weight, in the first GMVAE
    epochs).  No host read: the batch's partitioned examples are masked, not selected.
    """

    def __init__(self, model, guide, labels: torch.Tensor, size: int | None = None):
        self.model, self.guide, self.labels = model, guide, labels
        self.everywhere = size is None or size <= len(labels)

    def __call__(self, y: torch.Tensor, idx: torch.Tensor, log_r: torch.Tensor | None = None) -> torch.Tensor:
        """``log_r``: the batch's (B, K) log r(z | y), if the caller has it already."""
        if log_r is None:
            log_r = self.guide.cluster_log_probs(self.model, self.guide.encode(y))
        if self.everywhere:
            return torch.nn.functional.nll_loss(log_r, self.labels[idx])
        inside = idx < len(self.labels)
        clusters = self.labels[idx.clamp(max=len(self.labels) - 1)]
        picked = log_r.gather(-1, clusters.unsqueeze(-1)).squeeze(-1)
        return -(picked * inside).sum() / inside.sum().clamp(min=1)


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
    adam_kernel: str = "auto",
) -> dict:
    """Train the whole GMVAE on its objective plus ``weight`` x the cross-entropy to ``labels``.

    ``x_points`` (N, ...) are the partitioned examples and ``labels`` (N,) their clusters;
    the cross-entropy is that of the guide's cluster posterior r(z) at the posterior means.
    Uses its own Adam optimiser at ``lr`` and shuffles with ``generator``; a batch size
    above N is lowered to N.  Returns the mean loss (the GMVAE objective, nats per example)
    and the mean cross-entropy of each epoch.
    """
    batch_size = min(batch_size, len(x_points))  # --batch-size may exceed the 20,000 partitioned
    loss_fn = make_elbo(num_particles)(model, guide)
    optimizer = adam(loss_fn.parameters(), lr, adam_kernel)
    model.train()
    guide.train()
    labels = labels.to(x_points.device)
    cross_entropy = PartitionTerm(model, guide, labels)
    steps = len(x_points) // batch_size
    record = {"loss": [], "cross_entropy": []}
    bar = progress_bar(epochs * steps, "fit to the partition", progress)
    for epoch in range(1, epochs + 1):
        totals = run_epoch(
            lambda y: loss_fn(y) / len(y),
            optimizer,
            x_points,
            batch_size,
            generator,
            extra_loss=cross_entropy,
            extra_weight=weight,
            bar=bar,
            epoch=epoch,
            explain=_hint("the fit to the partition"),
        )
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
    adam_kernel: str = "auto",
) -> dict:
    """Train a copy of a seated GMVAE for ``epochs`` and score it; ``model`` and ``guide`` are untouched.

    The copy trains with the full objective (no KL warm-up) and a fresh Adam at ``lr``.
    Returns ``loss``, the mean training objective per example (nats, lower is better) on
    the first ``score_points`` training examples after the probe, and ``cluster_entropy``,
    the mean entropy of p(z | x, w) there.  A probe that diverges scores ``inf``.
    """
    model, guide = copy.deepcopy(model), copy.deepcopy(guide)
    loss_fn = make_elbo(num_particles)(model, guide)
    optimizer = adam(loss_fn.parameters(), lr, adam_kernel)
    model.train()
    guide.train()
    bar = progress_bar(epochs * (len(x_train) // batch_size), "probe of a start", progress)
    try:
        for epoch in range(1, epochs + 1):
            run_epoch(
                lambda y: loss_fn(y) / batch_size, optimizer, x_train, batch_size, generator, bar=bar, epoch=epoch
            )
        bar.set_postfix_str(f"scoring on {min(score_points, len(x_train))} training examples")
        terms = posterior.elbo_terms_dataset(model, guide, x_train[:score_points], num_particles)
    except (ValueError, NonFiniteLossError) as err:  # the probe diverged
        if isinstance(err, ValueError) and not is_invalid_values_error(err):
            raise
        return {"loss": math.inf, "cluster_entropy": math.nan}
    finally:
        bar.close()
    score = float(terms["loss"].mean())
    return {"loss": score if math.isfinite(score) else math.inf, "cluster_entropy": float(terms["cv"].mean())}


def initialize(
    model,
    guide,
    data: Dataset,
    x_train: torch.Tensor,
    config: Config,
    shuffle: torch.Generator,
    progress: bool,
    build=None,
    anchors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """``--init vae-kmeans|vae-umap``: pretrain the x-path as a VAE, seat the components on a
    partition of its latent means, and with ``config.init_fit_epochs`` > 0 fit the GMVAE to it.

    With ``config.init_restarts`` R > 1, R starts are made (the first from ``model`` and
    ``guide`` as given, the others from ``build()``, which returns a fresh model and guide on
    the training device), each is probed (:func:`~pyro_gmvae.initialization.probe_start`)
    and the one with the lowest objective is loaded into ``model`` and ``guide``; with
    ``config.init_select`` "consensus" the one whose partition agrees most with the others'.

    Returns the record written to ``init.json``: pretraining losses, the k-means objective,
    the fit's losses and cross-entropies, and the test metrics of the kept start before any
    GMVAE training, and with R > 1 one such record per start (with its probe score or its
    agreement; the test metrics there are reported, never used to choose); and under
    ``partition`` (not for ``init.json``) the kept start's partition, the cluster of each of
    the first ``len(partition)`` training examples, for ``--init-anchor-epochs``.  ``x_train`` is
    ``data.x`` already on the training device.  ``anchors`` (``--labels``: labelled indices
    and their classes) number the partition's clusters by class
    (:func:`~pyro_gmvae.partition.number_by_labels`).
    """
    t0 = time.perf_counter()
    restarts = config.init_restarts
    if restarts > 1 and build is None:
        raise ValueError("initialize: init_restarts > 1 needs build()")
    probing = restarts > 1 and config.init_select == "probe"
    records, assignments, best = [], [], None
    kept = {}  # restart -> (model, guide) of the starts that can still be chosen
    for restart in range(restarts):
        m, g = (model, guide) if restart == 0 else build()
        losses = pretrain_vae(
            m, g, x_train, config.pretrain_epochs, config.batch_size, config.pretrain_lr, shuffle, progress=progress,
            adam_kernel=config.adam_kernel,
        )  # fmt: skip
        seated = seat_components(
            m, g, x_train, config.seed + restart, method=PARTITIONS[config.init], progress=progress, anchors=anchors,
            weights=config.init_weights == "partition",
        )  # fmt: skip
        record = {"pretrain_loss": losses, "kmeans_inertia": seated["inertia"]}
        assignments.append(seated["assignments"])
        if config.init_fit_epochs > 0:
            labels = seated["assignments"]
            record["fit"] = fit_to_partition(
                m, g, x_train[: len(labels)], labels, config.init_fit_epochs, config.batch_size,
                config.pretrain_lr, config.init_fit_weight, config.mc_samples, shuffle, progress=progress,
                adam_kernel=config.adam_kernel,
            )  # fmt: skip
        if probing:
            probe = probe_start(
                m, g, x_train, config.init_probe_epochs, config.batch_size, config.lr, config.mc_samples, shuffle,
                progress=progress, adam_kernel=config.adam_kernel,
            )  # fmt: skip
            finite = math.isfinite(probe["loss"])  # a diverged probe (inf) is never kept
            record.update(
                probe_loss=probe["loss"] if finite else None,  # None: diverged (JSON has no inf)
                probe_cluster_entropy=probe["cluster_entropy"] if finite else None,
            )
            if finite and (best is None or probe["loss"] < records[best]["probe_loss"]):
                best = restart
        with status(f"evaluating the start on {len(data.x_test)} test examples", progress):
            record["test_at_init"] = posterior.evaluate(m, g, data)
        records.append(record)
        if restarts > 1:  # the seated state (not a probe's) of every start that can still be chosen
            kept[restart] = (m, g)
            if probing:  # only the best probe so far can be chosen: the others are dropped now
                kept = {r: pair for r, pair in kept.items() if r == best}
        logger.info("start %d of %d: %s", restart + 1, restarts, record)
    if probing and best is None:
        raise NonFiniteLossError(f"the probes of all {restarts} starts diverged; lower --lr")
    if restarts > 1 and not probing:  # consensus: the start whose partition the others agree with most
        agreement = consensus_scores(assignments)
        for record, score in zip(records, agreement, strict=True):
            record["agreement"] = score
        best = max(range(restarts), key=agreement.__getitem__)
    if best:  # start 0 was made in model and guide themselves
        model.load_state_dict(kept[best][0].state_dict())
        guide.load_state_dict(kept[best][1].state_dict())
    chosen = records[best or 0]
    out = {
        "init": config.init,
        "pretrain_epochs": config.pretrain_epochs,
        "pretrain_lr": config.pretrain_lr,
        "pretrain_loss": chosen["pretrain_loss"],
        "kmeans_inertia": chosen["kmeans_inertia"],
        "fit_epochs": config.init_fit_epochs,
        "fit_weight": config.init_fit_weight,
        "fit": chosen.get("fit"),
        "seconds": time.perf_counter() - t0,
        "test_at_init": chosen["test_at_init"],
        "partition": assignments[best or 0],
    }
    if restarts > 1:
        out.update(restarts=records, chosen=best, select=config.init_select)
        if probing:
            out["probe_epochs"] = config.init_probe_epochs
    logger.info("initialised (%s): %s", config.init, {k: v for k, v in out.items() if k != "partition"})
    return out
