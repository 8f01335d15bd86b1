"""Training: ``train(config)`` runs a whole GMVAE run and returns it as a :class:`~pyro_gmvae.runs.Run`.

It validates the options and the data, builds model and guide, optionally makes the start
(:func:`~pyro_gmvae.initialization.initialize`), trains with Adam on
``TraceEnum_ELBO(...)(model, guide)`` through :func:`~pyro_gmvae.loop.run_epoch`, evaluates
on the test split every epoch and records it all in a
:class:`~pyro_gmvae.runfolder.RunFolder`.  Each epoch ends with an atomic checkpoint that
holds everything needed to resume bit-for-bit on CPU.  The schedules (learning rate, KL
warm-up) are functions of the epoch, passed into each epoch as arguments.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
import traceback
from collections.abc import Callable

import pyro
import torch

from pyro_gmvae import allocator, augment, binarize, distributed, faults, posterior, semisupervised
from pyro_gmvae.autoconfig import kmeans_baseline, npz_defaults
from pyro_gmvae.build import build_model_and_guide
from pyro_gmvae.config import DATA_PRESETS, Config
from pyro_gmvae.data import Dataset, load_dataset, prepare_data, select_splits
from pyro_gmvae.distributed import resolve_device
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.initialization import PartitionTerm, initialize
from pyro_gmvae.loop import adam, progress_bar, run_epoch
from pyro_gmvae.objective import elbo_terms, make_elbo
from pyro_gmvae.runfolder import FINAL_KEYS, INIT_NAME, RESUME_KEYS, RunFolder, final_metrics, set_rng_state
from pyro_gmvae.runs import Run
from pyro_gmvae.tensorboard_log import TensorBoardLog

logger = logging.getLogger(__name__)

__all__ = ["FINAL_KEYS", "INIT_NAME", "RESUME_KEYS", "epoch_lr", "kl_weight", "train"]


def epoch_lr(config: Config, epoch: int) -> float:
    """Learning rate of ``epoch`` (1-based): constant, or cosine from lr to lr_final.

    A function of the epoch and ``--epochs`` alone, so a run resumed with the same ``--epochs``
    follows the same schedule; resuming with a larger ``--epochs`` stretches the rest of it.
    """
    if config.lr_final is None:
        return config.lr
    progress = (epoch - 1) / max(1, config.epochs - 1)
    return config.lr_final + 0.5 * (config.lr - config.lr_final) * (1 + math.cos(math.pi * progress))


def anchor_weight(config: Config, epoch: int) -> float:
    """``--init-anchor-epochs`` N: the weight of the start's partition term in GMVAE epoch
    ``epoch`` (1-based), ``init_fit_weight`` x (N + 1 - epoch) / (N + 1) up to epoch N, then 0."""
    n = config.init_anchor_epochs
    return config.init_fit_weight * (n + 1 - epoch) / (n + 1) if epoch <= n else 0.0


def phase_terms(model, guide, terms: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(y, idx)`` -> the terms beside the ELBO, shape (len(terms),), in the order of
    ``terms`` (name -> ``(y, idx, log_r) -> term``): the batch's cluster posterior log r(z | y)
    is computed once and shared."""

    def extra(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        log_r = guide.cluster_log_probs(model, guide.encode(y))
        return torch.stack([term(y, idx, log_r) for term in terms.values()])

    return extra


def parameter_groups(model, loss_fn, config: Config) -> list:
    """What the GMVAE phase's Adam steps: every parameter at --lr, or with ``config.prior_lr``
    two groups, the rest at --lr and the prior network's at prior_lr, whose ``lr_scale``
    (prior_lr / lr) keeps the ratio when :func:`epoch_lr` changes the learning rate."""
    params = list(loss_fn.parameters())
    if config.prior_lr is None:
        return params
    prior = {id(p) for p in model.prior.parameters()}
    scale = config.prior_lr / config.lr
    return [
        {"params": [p for p in params if id(p) not in prior]},
        {"params": [p for p in params if id(p) in prior], "lr": config.prior_lr, "lr_scale": scale},
    ]


def kl_weight(config: Config, epoch: int) -> float:
    """KL warm-up's beta: epoch / (kl_warmup + 1) for the first ``kl_warmup`` epochs, then 1."""
    return 1.0 if epoch > config.kl_warmup else epoch / (config.kl_warmup + 1)


def nonfinite_report(model, guide, y: torch.Tensor) -> str:
    """Name the input or the ELBO terms that went non-finite on a batch."""
    if not torch.isfinite(y).all():
        return "the input batch holds NaN or infinite values"
    with torch.no_grad(), pyro.validation_enabled(False):  # report NaN instead of raising on it
        terms = elbo_terms(model, guide, y)
    bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
    if bad:
        return "non-finite terms: " + ", ".join(bad)
    return "the loss is finite but a gradient is not"


def _start(model, guide, data, x_train, config, shuffle, info, device, split=None) -> dict | None:
    """``--init vae-*`` (before DDP wraps the model: every rank makes the same start); with
    ``--labels`` its clusters are numbered by the labelled examples' classes."""
    if config.init == "random":
        return None

    def build():
        m, g = build_model_and_guide(config, data.data_shape)
        return m.to(device), g.to(device)

    show = config.progress and info.is_main
    anchors = None if split is None else (split.indices, split.classes)
    return initialize(model, guide, data, x_train, config, shuffle, progress=show, build=build, anchors=anchors)


def _partition(state: dict | None, init_record: dict | None, device) -> torch.Tensor | None:
    """The start's partition (its cluster of each of the first N training examples): from
    the start just made, or from the checkpoint of a resumed run; None without a vae-* start."""
    if init_record is not None:
        return init_record.pop("partition").to(device)
    if state is not None and state.get("partition") is not None:
        return state["partition"].to(device)
    return None


def _resolve(config: Config, data: Dataset | None) -> tuple[Config, Dataset | None, bool]:
    """The resolved config, the data, and whether they are split already (a ``.npz`` file's are).

    For a ``.npz`` file the options the user left unset come from
    :func:`~pyro_gmvae.autoconfig.npz_defaults` of its training split (likelihood from the
    value range, sizes, batch, start and epochs from N and D) before the static preset.
    Other data are loaded later, once the options and the run folder are checked.
    """
    if config.preset_name() != "npz":
        return config.resolved(), data, False
    if data is None:
        data = load_dataset(config.data, config.data_root, config.download)
    data = select_splits(config, data)
    k = config.K or DATA_PRESETS["npz"]["K"]
    return config.resolved(npz_defaults(data.x.numpy(), k)), data, True


def resolved_config(config: Config, data: Dataset | None = None) -> Config:
    """``config`` with every unset option filled as :func:`train` fills it (for a ``.npz``
    file from its training array); what ``run.py --show-config`` prints."""
    return _resolve(config, data)[0]


def _prepare(config: Config, resume: bool, overwrite: bool, data: Dataset | None):
    """Resolve and check the options, the device, the run folder, the checkpoint and the data."""
    config, data, split = _resolve(config, data)
    config.validate()
    device = resolve_device(config.device)
    info = distributed.init(device)  # under torchrun: RANK, WORLD_SIZE, LOCAL_RANK
    device = distributed.local_device(info, device)
    folder = None
    try:
        distributed.per_rank_batch(config.batch_size, info)  # --batch-size is the global batch
        if info.enabled and config.augment_weight:  # its term is outside the module DDP wraps
            raise UserInputError("--augment-weight does not run under torchrun yet; pass --augment-weight 0")
        if info.enabled and config.init_anchor_epochs:  # so is this one
            raise UserInputError("--init-anchor-epochs does not run under torchrun yet; pass --init-anchor-epochs 0")
        if config.out is None:  # a fresh numbered folder, named by rank 0 for every rank
            new = lambda: RunFolder.create_default(config) if info.is_main else None  # noqa: E731
            folder = distributed.raise_together(new, info)
            config.out = distributed.broadcast(str(folder.path) if folder else None, info)
        folder = folder or RunFolder(config.out, writer=info.is_main)
        config.out = str(folder.path)
        distributed.raise_together(lambda: folder.check(resume, overwrite), info)  # rank 0 locks the folder
        distributed.barrier(info)  # every rank has checked the folder before rank 0 writes to it
        state = folder.resume_state(config) if resume else None
        data = prepare_data(config, data, split=not split)
        if state is not None and tuple(state["data_shape"]) != data.data_shape:
            raise UserInputError(
                f"the checkpoint in {folder.path} was trained on examples of shape {tuple(state['data_shape'])}, "
                f"the data now have {data.data_shape}; resume with the same data"
            )
        # Before the data reach the device and before any pretraining: K and memory fit.
        sizes = (config, data.data_shape, len(data.x), len(data.x_test), device)
        distributed.raise_together(lambda: faults.check_sizes(*sizes), info)
    except BaseException:
        if folder is not None:
            folder.close()  # a refused run leaves no folder it created
        distributed.shutdown(info, clean=False)
        raise
    return config, info, device, folder, state, data


def _restore(state: dict | None, model, guide, optimizer, shuffle) -> tuple[list[dict], int]:
    """Load a checkpoint's modules, optimiser and RNG state; return its history and epoch."""
    if state is None:
        return [], 0
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    scales = [group.get("lr_scale") for group in optimizer.param_groups]  # this config's --prior-lr ratio
    optimizer.load_state_dict(state["optimizer"])
    for group, scale in zip(optimizer.param_groups, scales, strict=True):  # wins, as --lr given on resume does
        if scale is not None:
            group["lr_scale"] = scale
    set_rng_state(state["rng"], shuffle)
    return list(state["history"]), state["epoch"]


def _checkpoint(config, data, model, guide, optimizer, history, partition=None) -> dict:
    state = {
        "config": config.to_dict(),
        "data_shape": list(data.data_shape),
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": history[-1]["epoch"],
        "history": history,
    }
    if partition is not None and config.init_anchor_epochs:  # for a resume inside the anchor's epochs
        state["partition"] = partition.cpu()
    return state


def _test_metrics(model, guide, data, labelled: bool = False) -> dict:
    """The test split's ELBO terms and clustering metrics; with ``--labels`` (cluster c is
    class c) also the plain accuracy."""
    test = posterior.evaluate(model, guide, data)
    row = {f"test_{k}" if k in ("elbo", "loss") else k: v for k, v in test.items()}
    if labelled and data.labels_test is not None:
        row["acc_supervised"] = semisupervised.accuracy(model, guide, data.x_test, data.labels_test)
    return row


def _summary(history: list[dict], data: Dataset, config: Config, labelled: bool) -> dict:
    """metrics.json: the last epoch's metrics, plain accuracy with ``--labels``, and with test
    labels the k-means baseline (same raw features, same K, same test split)."""
    final = final_metrics(history)
    if labelled:
        final["acc_supervised"] = history[-1].get("acc_supervised")
    if data.labels_test is not None:
        final["kmeans_hungarian"] = kmeans_baseline(data, config.K, config.seed)
    return final


def _finish(folder, model, guide, data, config, history, labelled: bool, make_figures: bool) -> dict:
    """Write metrics.json (:func:`_summary`) and the figures; return the summary."""
    final = _summary(history, data, config, labelled)
    folder.write_summary(final)
    if make_figures:
        from pyro_gmvae.plots import make_run_figures

        with folder.writing(folder.path / "figures"):
            make_run_figures(folder.path, model, guide, data, history)
    return final


@contextlib.contextmanager
def denormals_flushed(flush: bool):
    """``--flush-denormal``: inside, the CPU treats denormal floats as zero (where it can:
    ``torch.set_flush_denormal``, x86 with SSE3); afterwards it keeps them again, so that
    the runs after this one in the same process compute as they would alone."""
    if not flush:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def train(
    config: Config,
    resume: bool = False,
    overwrite: bool = False,
    data: Dataset | None = None,
    make_figures: bool = True,
) -> Run:
    """Train a GMVAE run as described by ``config``, write its run folder and return it.

    ``config``'s ``None`` entries are filled from the data preset.  ``resume`` continues
    the run in ``config.out`` from its checkpoint (``config.epochs`` is the total);
    ``overwrite`` replaces whatever ``config.out`` holds; ``data`` is used instead of
    loading ``config.data``; ``make_figures`` writes ``figures/*.png`` at the end.
    Without ``config.out`` the run gets a fresh folder (:meth:`RunFolder.create_default`).

    The folder is locked for the run.  A ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM as
    :class:`~pyro_gmvae.faults.Terminated`) is re-raised with ``run_folder`` and
    ``last_epoch`` (of the last complete checkpoint, or None) set on it.  Under torchrun
    every rank leaves the process group together at the end.

    It first sets glibc's allocator to keep the memory a step frees for the next step
    (:func:`pyro_gmvae.allocator.keep_freed_memory`: fewer page faults, the same results);
    that setting is process-wide and stays.
    """
    allocator.keep_freed_memory()
    config, info, device, folder, state, data = _prepare(config, resume, overwrite, data)
    if info.is_main:
        print(f"run folder: {folder.path}", flush=True)
    try:
        with denormals_flushed(config.flush_denormal):
            return _train(config, info, device, folder, state, data, overwrite, make_figures)
    except BaseException as err:
        interrupt = faults.interrupt_behind(err)  # also one that TorchScript wrapped in a RuntimeError
        if interrupt is not None:
            interrupt.run_folder, interrupt.last_epoch = folder.path, folder.last_epoch
        if info.enabled:  # drop the DDP wrapper that _train's frames hold, then leave the group
            traceback.clear_frames(err.__traceback__)
            gc.collect()
        distributed.shutdown(info, clean=False)
        if interrupt is not None and interrupt is not err:
            raise interrupt from err
        raise
    finally:
        folder.close()


def _train(config, info, device, folder, state, data, overwrite, make_figures) -> Run:
    pyro.set_rng_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    model, guide = build_model_and_guide(config, data.data_shape)
    model.to(device)
    guide.to(device)
    x_train = data.x.to(device)
    split = semisupervised.LabelledSplit.draw(config, data, device) if config.labels else None
    init_record = _start(model, guide, data, x_train, config, shuffle, info, device, split) if state is None else None
    if config.pseudo_labels:  # self-training: the start's most confident assignments, observed as z
        if state is None:
            split = semisupervised.LabelledSplit.confident(model, guide, x_train, config.pseudo_labels, config.seed)
        else:
            record = json.loads((folder.path / semisupervised.LABELS_NAME).read_text())
            split = semisupervised.LabelledSplit.from_record(record, len(x_train), device)
    loss_fn = make_elbo(config.mc_samples, config.elbo)(model, guide)
    if split is not None:  # --labels: the unlabelled ELBO plus the labelled one, in one module DDP can wrap
        loss_fn = semisupervised.SemiSupervisedLoss(loss_fn, model, guide, config.mc_samples, config.label_weight)
    step_loss = distributed.wrap(loss_fn, info, device)  # DDP over the ELBO module, or loss_fn
    partition = _partition(state, init_record, device)
    if config.init_anchor_epochs and partition is None:  # a checkpoint from before the option
        raise UserInputError(f"--init-anchor-epochs: the checkpoint in {folder.path} holds no start partition")
    # Beside the ELBO: --augment-weight, -log P(an image and a moved copy share a cluster), and
    # --init-anchor-epochs, the cross-entropy to the start's partition with a falling weight.
    consistency = augment.ConsistencyTerm(model, guide, shuffle) if config.augment_weight else None
    anchor = PartitionTerm(model, guide, partition, len(x_train)) if config.init_anchor_epochs else None
    optimizer = adam(parameter_groups(model, loss_fn, config), config.lr, config.adam_kernel)
    history, start_epoch = _restore(state, model, guide, optimizer, shuffle)
    if info.enabled:  # same init on every rank; Monte Carlo noise of its own per rank
        pyro.set_rng_seed(distributed.rank_seed(config.seed, info.rank, start_epoch))
    folder.open(config, history, replace=overwrite and state is None)
    if init_record is not None:
        folder.write_init(init_record)
    if split is not None:
        folder.write_json(semisupervised.LABELS_NAME, split.record())

    steps = (len(x_train) if split is None else len(split.unlabelled)) // config.batch_size
    show = config.progress and info.is_main
    bar = progress_bar((config.epochs - start_epoch) * steps, f"{config.data} K={config.K}", show)
    board = TensorBoardLog(folder.path, start_epoch, enabled=config.tensorboard and info.is_main)  # --tensorboard
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        beta = kl_weight(config, epoch)
        where = f"the last good checkpoint (epoch {history[-1]['epoch'] if history else start_epoch}) in {folder.path}"
        model.train()
        guide.train()
        x_epoch = binarize.epoch_draw(x_train, shuffle) if config.binarize == "dynamic" else x_train

        def epoch_loss(y, beta=beta):
            return step_loss(y, kl_weight=beta) / len(y)  # DDP averages over ranks

        if split is not None:  # each step: an unlabelled batch of x_epoch and a labelled batch drawn with shuffle
            x_epoch, x_labelled = split.split(x_epoch)
            epoch_loss = semisupervised.step_loss(step_loss, split, x_labelled, beta, shuffle)
        weights = {"augment": config.augment_weight, "anchor": anchor_weight(config, epoch)}
        terms = {name: term for name, term in (("augment", consistency), ("anchor", anchor)) if weights[name]}
        total = run_epoch(
            epoch_loss,
            optimizer,
            x_epoch,
            config.batch_size,
            shuffle,
            lr=epoch_lr(config, epoch),  # every epoch, so a --lr given on resume takes effect
            extra_loss=phase_terms(model, guide, terms) if terms else None,
            extra_weight=[weights[name] for name in terms],
            batch_indices=lambda perm, step, size: distributed.shard(perm, step, size, info),
            bar=bar,
            epoch=epoch,
            explain=lambda y, where=where: f"{nonfinite_report(model, guide, y)}; {where} is intact",
        )
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "kl_weight": beta}
        total = distributed.all_reduce_mean(total, info)
        if not terms:
            row["train_loss"] = float(total) / steps
        else:  # the ELBO's loss and each term beside it, each a mean per example
            row["train_loss"] = float(total[0]) / steps
            row.update({name: float(value) / steps for name, value in zip(terms, total[1:], strict=True)})
        if not info.is_main:  # rank 0 evaluates and writes the run folder
            continue
        bar.set_postfix_str(f"evaluating on {len(data.x_test)} test examples")
        row.update(_test_metrics(model, guide, data, labelled=bool(config.labels)))
        history.append({**row, "seconds": seconds, "elapsed": (history[-1]["elapsed"] if history else 0.0) + seconds})
        row = history[-1]
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row.get('acc_hungarian', math.nan):.3f}")
        folder.save_checkpoint(_checkpoint(config, data, model, guide, optimizer, history, partition), shuffle)
        folder.append_metrics(row)
        board.write(row)
        logger.info("epoch %d: %s", epoch, row)
    bar.close()
    board.close()
    labelled = bool(config.labels)  # true labels: cluster c is class c
    final = _finish(folder, model, guide, data, config, history, labelled, make_figures) if info.is_main else {}
    # Release DDP (its reducer holds gloo work objects) before the group goes, then leave
    # it on every rank at once: the other ranks have waited here while rank 0 wrote.
    step_loss = None  # noqa: F841 (the epoch lambdas close over it)
    gc.collect()
    distributed.shutdown(info)
    return Run(folder.path, config, model, guide, data.data_shape, history, final, device)
