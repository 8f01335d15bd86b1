"""Semi-supervised training with a few labels (``--labels N``), after Pyro's M2 tutorial.

With K equal to the number of classes, class c is cluster c, so a label is an observation
of the cluster variable: a labelled example observes ``z = c`` in the model (``obs=``) and
every other training example stays unlabelled.  The N labelled examples are a seeded draw
balanced over the classes (:func:`draw_labels`), saved in the run folder as ``labels.json``.

Every optimiser step takes an unlabelled batch (the examples outside the draw, in the
epoch's shuffled order) and a labelled batch of the same size drawn with replacement from
the N, and minimises (:class:`SemiSupervisedLoss`)::

    loss = mean_{u in U-batch} [ -ELBO(y_u) ]
         + mean_{l in L-batch} [ -ELBO(y_l, z = c_l) - label_weight * log r(z = c_l | y_l) ]

    ELBO(y)        the unsupervised GMVAE bound (z summed out), with its regularisers
    ELBO(y, z=c) = E_q(x|y) q(w|y) [ log p(y|x) + log N(x; mu_c(w), sigma_c(w)) + log pi_c
                                      + log p(w) - log q(x|y) - log q(w|y) ]
                   the supervised bound on log p(y, z=c) (z observed; no regulariser)
    r              the guide's cluster posterior: q(z|y) for v1 (M2's classifier term);
                   p(z | x, w) at the posterior means of x and w for v2, the very r that
                   assigns test examples

Both batch means weigh the same, so over an epoch each labelled example weighs |U| / N
times an unlabelled one: the labelled and the unlabelled sets count equally.  For v2 the
supervised ELBO alone already trains p(z | x, w) (it pulls x towards component c);
``label_weight`` adds the direct classification term on top (0 turns it off).  The cluster
to class map is the identity, so plain test accuracy (``acc_supervised``) is reported.

``--pseudo-labels N`` uses the same path without labels (self-training): after an
``--init vae-*`` start, the N training examples the start assigns most confidently observe
their own cluster (:meth:`LabelledSplit.confident`); only the unsupervised metrics are reported.
"""

from __future__ import annotations

import numpy as np
import torch
from pyro.infer import TraceEnum_ELBO

from pyro_gmvae import posterior
from pyro_gmvae.errors import UserInputError

LABELS_NAME = "labels.json"


def num_classes(labels: torch.Tensor) -> int:
    """Classes are 0..C-1: C = the largest label + 1."""
    return int(labels.max()) + 1


def check(config, data) -> None:
    """Refuse ``--labels N`` (or ``--pseudo-labels N``) that the data or K cannot serve; one-line UserInputError."""
    pseudo = config.pseudo_labels
    if pseudo and len(data.x) - pseudo < config.batch_size:
        raise UserInputError(
            f"--pseudo-labels {pseudo} leaves {len(data.x) - pseudo} of the {len(data.x)} training examples "
            f"unlabelled, fewer than the batch size {config.batch_size}; pass a smaller --pseudo-labels"
        )
    if not config.labels:
        return
    if data.labels is None:
        raise UserInputError(f"--labels {config.labels} needs labelled training data; {data.name} has no labels")
    classes = num_classes(data.labels)
    if config.K != classes:
        raise UserInputError(
            f"--labels needs --K equal to the number of classes ({classes} in {data.name}), got --K {config.K}"
        )
    if config.labels > len(data.x):
        raise UserInputError(
            f"--labels {config.labels} exceeds the {len(data.x)} training examples; pass at most {len(data.x)}"
        )
    counts = torch.bincount(data.labels, minlength=classes)
    quota = -(-config.labels // classes)  # the largest per-class share
    short = [c for c in range(classes) if counts[c] < quota]
    if short:
        raise UserInputError(
            f"--labels {config.labels} needs {quota} examples of every class, but class {short[0]} has "
            f"{int(counts[short[0]])}; pass a smaller --labels"
        )
    unlabelled = len(data.x) - config.labels
    if unlabelled < config.batch_size:
        raise UserInputError(
            f"--labels {config.labels} leaves {unlabelled} unlabelled examples, fewer than the batch size "
            f"{config.batch_size}; pass a smaller --labels or --batch-size"
        )


def draw_labels(labels: torch.Tensor, num_labels: int, seed: int) -> torch.Tensor:
    """Indices (sorted, int64) of ``num_labels`` examples balanced over the classes.

    Each class gets ``num_labels // C`` examples and ``num_labels % C`` classes, chosen at
    random, one more; the examples of a class are drawn without replacement.  A function of
    ``(labels, num_labels, seed)`` alone (numpy's generator seeded with ``seed``).
    """
    y = labels.cpu().numpy()
    classes = num_classes(labels)
    rng = np.random.default_rng(seed)
    quota = np.full(classes, num_labels // classes)
    quota[rng.permutation(classes)[: num_labels % classes]] += 1
    chosen = [rng.choice(np.flatnonzero(y == c), size=int(quota[c]), replace=False) for c in range(classes)]
    return torch.from_numpy(np.sort(np.concatenate(chosen)).astype(np.int64))


class LabelledSplit:
    """The training set split into the N labelled examples and the unlabelled rest.

    ``indices`` (N,) and ``unlabelled`` (|U|,) index ``data.x``; ``classes`` (N,) are the
    observed clusters of ``indices``, on ``device``: the labels of a seeded draw
    (:meth:`draw`, ``--labels``) or the start's own most confident assignments
    (:meth:`confident`, ``--pseudo-labels``, no label read).
    """

    def __init__(self, indices: torch.Tensor, classes: torch.Tensor, num_examples: int, seed: int, device, kind: str):
        self.seed, self.kind = seed, kind
        self.indices = indices.cpu()
        mask = torch.ones(num_examples, dtype=torch.bool)
        mask[self.indices] = False
        self.unlabelled = torch.nonzero(mask).squeeze(-1)
        self.classes = classes.to(device)
        self._indices, self._unlabelled = self.indices.to(device), self.unlabelled.to(device)

    @classmethod
    def draw(cls, config, data, device) -> LabelledSplit:
        """``--labels N``: a seeded draw of N labelled examples balanced over the classes."""
        indices = draw_labels(data.labels, config.labels, config.seed)
        return cls(indices, data.labels[indices], len(data.x), config.seed, device, "labels")

    @classmethod
    def confident(cls, model, guide, x: torch.Tensor, num: int, seed: int) -> LabelledSplit:
        """``--pseudo-labels N``: in each cluster the N // K training examples (N % K clusters
        one more) whose cluster probability under the start is highest, observed as that cluster."""
        probs = posterior.cluster_probs(model, guide, x)  # (N, K), p(z | x, w) or q(z | y)
        conf, assigned = probs.max(-1)
        k = probs.shape[-1]
        quota = [num // k + (c < num % k) for c in range(k)]
        chosen = []
        for c in range(k):
            members = torch.nonzero(assigned == c).squeeze(-1)
            chosen.append(members[conf[members].argsort(descending=True)[: quota[c]]])
        indices = torch.cat(chosen).sort().values.cpu()
        return cls(indices, assigned[indices.to(assigned.device)], len(x), seed, x.device, "pseudo-labels")

    @classmethod
    def from_record(cls, record: dict, num_examples: int, device) -> LabelledSplit:
        """The split ``labels.json`` describes (a resumed ``--pseudo-labels`` run)."""
        indices = torch.tensor(record["indices"], dtype=torch.long)
        return cls(indices, torch.tensor(record["classes"]), num_examples, record["seed"], device, record["kind"])

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unlabelled examples, labelled examples) of the training tensor ``x`` (on the device)."""
        return x[self._unlabelled], x[self._indices]

    def record(self) -> dict:
        """What ``labels.json`` holds: what observed z, the seed, the count per class, the indices and classes."""
        counts = torch.bincount(self.classes.cpu(), minlength=int(self.classes.max()) + 1)
        return {
            "kind": self.kind,
            "num_labels": len(self.indices),
            "seed": self.seed,
            "per_class": [int(c) for c in counts],
            "indices": [int(i) for i in self.indices],
            "classes": [int(c) for c in self.classes.cpu()],
        }


def supervised_elbo(num_particles: int = 1) -> TraceEnum_ELBO:
    """The ELBO of labelled batches: ``make_elbo``'s settings, with no enumerated site to warn about."""
    return TraceEnum_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=1,
        strict_enumeration_warning=False,
    )


def classifier_loss(model, guide, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log r(z = label | y) per example, shape (B,); r is the guide's cluster posterior."""
    log_r = guide.cluster_log_probs(model, guide.encode(y))
    return -log_r.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


class SemiSupervisedLoss(torch.nn.Module):
    """The step loss of the module docstring, a module (DDP can wrap it).

    ``unsupervised`` is the ELBO module of the unlabelled batches (``make_elbo(M)(model,
    guide)``); the labelled ones get :func:`supervised_elbo` on the same model and guide.
    """

    def __init__(self, unsupervised: torch.nn.Module, model, guide, num_particles: int = 1, label_weight: float = 1.0):
        super().__init__()
        self.unsupervised = unsupervised
        self.supervised = supervised_elbo(num_particles)(model, guide)
        self.model, self.guide = model, guide
        self.label_weight = label_weight

    def labelled_loss(self, y: torch.Tensor, labels: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """Mean over the labelled batch of -ELBO(y, z=label) + label_weight * (-log r(label))."""
        loss = self.supervised(y, kl_weight=kl_weight, labels=labels) / len(y)
        if self.label_weight > 0:
            loss = loss + self.label_weight * classifier_loss(self.model, self.guide, y, labels).mean()
        return loss

    def forward(self, y, y_labelled, labels, kl_weight: float = 1.0) -> torch.Tensor:
        return self.unsupervised(y, kl_weight=kl_weight) / len(y) + self.labelled_loss(y_labelled, labels, kl_weight)


def step_loss(loss_module, split: LabelledSplit, x_labelled: torch.Tensor, beta: float, generator: torch.Generator):
    """``y -> loss`` for :func:`~pyro_gmvae.loop.run_epoch`: each call draws a labelled batch of
    ``len(y)`` with replacement from ``x_labelled`` with ``generator`` (the run's data-order
    generator, saved in the checkpoint, so a resumed run draws the same batches)."""

    def loss(y: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(len(x_labelled), (len(y),), generator=generator).to(x_labelled.device)
        return loss_module(y, x_labelled[pick], split.classes[pick], kl_weight=beta)

    return loss


def accuracy(model, guide, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Plain accuracy of the assignments (cluster c = class c)."""
    return float((posterior.assign(model, guide, x) == labels.cpu()).double().mean())
