"""Training: a plain torch loop over ``TraceEnum_ELBO(...)(model, guide)`` with Adam.

``train(config)`` does a whole run: validates the options and the data, builds model and
guide, trains with a progress bar, evaluates on the test split every epoch, writes the
run folder (DESIGN.md section 8) and returns a :class:`RunResult`.  Each epoch ends with
an atomic checkpoint that holds everything needed to resume bit-for-bit on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyro_gmvae import checkpoint as ckpt
from pyro_gmvae import distributed
from pyro_gmvae.build import CHOICES, build_model_and_guide
from pyro_gmvae.config import Config
from pyro_gmvae.data import DATASETS, Dataset, load_dataset, validate_dataset
from pyro_gmvae.errors import NonFiniteLossError, UserInputError
from pyro_gmvae.initialization import INITS, PARTITIONS, fit_to_partition, pretrain_vae, probe_start, seat_components
from pyro_gmvae.likelihoods import LIKELIHOODS
from pyro_gmvae.metrics import clustering_metrics
from pyro_gmvae.networks import CONV_LAYOUTS
from pyro_gmvae.objective import elbo_terms, make_elbo
from pyro_gmvae.posterior import cluster_probs, elbo_terms_dataset

logger = logging.getLogger(__name__)

# Options that fix the architecture: a checkpoint only resumes or loads under the same ones.
ARCHITECTURE_KEYS = ("data", "network", "likelihood", "prior", "guide", "K", "x_dim", "w_dim", "hidden_dim")
# What a checkpoint must hold to resume a run.
RESUME_KEYS = ("config", "data_shape", "model", "guide", "optimizer", "rng", "epoch", "history")
INIT_NAME = "init.json"  # what --init did before the first epoch
FINAL_KEYS = ("acc_paper", "acc_hungarian", "purity", "nmi", "ari", "elbo", "clusters_used", "epochs", "seconds")


@dataclass
class RunResult:
    out: Path
    config: Config
    model: torch.nn.Module
    guide: torch.nn.Module
    history: list[dict]
    final: dict


# --- validation -----------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """Turn ``cpu``, ``cuda`` or ``cuda:N`` into a device, or raise UserInputError."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserInputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserInputError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserInputError(f"device {name!r} requested but only {count} GPU(s) exist (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise UserInputError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def validate_config(config: Config) -> None:
    """Check a resolved config; raise UserInputError with the fix."""
    if not (config.data in DATASETS or config.data.endswith(".npz")):
        raise UserInputError(f"unknown --data {config.data!r}; choose one of {', '.join(DATASETS)}")
    for key, valid in CHOICES.items():
        if getattr(config, key) not in valid:
            raise UserInputError(f"unknown --{key} {getattr(config, key)!r}; choose one of {', '.join(valid)}")
    if not isinstance(config.kl_warmup, int) or config.kl_warmup < 0:
        raise UserInputError(f"--kl-warmup must be an integer >= 0, got {config.kl_warmup}")
    if config.init not in INITS:
        raise UserInputError(f"unknown --init {config.init!r}; choose one of {', '.join(INITS)}")
    for key in ("pretrain_epochs", "init_restarts", "init_probe_epochs"):
        value = getattr(config, key)
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    if not isinstance(config.init_fit_epochs, int) or config.init_fit_epochs < 0:
        raise UserInputError(f"--init-fit-epochs must be an integer >= 0, got {config.init_fit_epochs}")
    if not isinstance(config.init_fit_weight, (int, float)) or not config.init_fit_weight >= 0:
        raise UserInputError(f"--init-fit-weight must be a number >= 0, got {config.init_fit_weight}")
    if config.init == "random":
        for key, off in (("init_restarts", 1), ("init_fit_epochs", 0)):
            if getattr(config, key) != off:
                flag = "--" + key.replace("_", "-")
                raise UserInputError(
                    f"{flag} needs --init vae-kmeans or vae-umap (PyTorch's initialisation has no partition)"
                )
    for key in ("K", "x_dim", "w_dim", "hidden_dim", "epochs", "batch_size", "mc_samples"):
        value = getattr(config, key)
        if not isinstance(value, int) or value < 1:
            flag = "--" + key.replace("_", "-")
            raise UserInputError(f"{flag} must be a positive integer, got {value}")
    for key in ("lr", "lr_final", "pretrain_lr"):
        value = getattr(config, key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserInputError(f"--{key.replace('_', '-')} must be a positive number, got {value}")
    for key in ("z_prior_weight", "cv_weight", "free_bits"):
        value = getattr(config, key)
        if not (value >= 0 and math.isfinite(value)):
            raise UserInputError(f"--{key.replace('_', '-')} must be a finite number >= 0, got {value}")
    for key in ("train_subset", "test_subset"):
        value = getattr(config, key)
        if value is not None and value < 1:
            raise UserInputError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")


def prepare_data(config: Config, data: Dataset | None = None) -> Dataset:
    """Load (unless given), subset and validate the data for a resolved config."""
    if data is None:
        data = load_dataset(config.data, config.data_root, config.download)
    if config.train_subset:
        data.x = data.x[: config.train_subset]
        data.labels = None if data.labels is None else data.labels[: config.train_subset]
    if config.test_subset:
        data.x_test = data.x_test[: config.test_subset]
        data.labels_test = None if data.labels_test is None else data.labels_test[: config.test_subset]
    validate_dataset(data, LIKELIHOODS[config.likelihood].data_range, config.batch_size)
    check_data_shape(config, data.data_shape)
    return data


def check_data_shape(config: Config, data_shape: tuple[int, ...]) -> None:
    """The conv networks only take C x 28 x 28 or C x 32 x 32 images."""
    if config.network == "conv" and (len(data_shape) != 3 or tuple(data_shape[1:]) not in CONV_LAYOUTS):
        sizes = " or ".join(f"C x {h} x {w}" for h, w in CONV_LAYOUTS)
        raise UserInputError(
            f"{config.data}: examples of shape {tuple(data_shape)} do not fit --network conv, which needs {sizes} "
            "images; use --network fc"
        )


def default_out(config: Config) -> Path:
    name = Path(config.data).stem if config.data.endswith(".npz") else config.data
    return Path("runs") / f"{name}-{config.guide}-K{config.K}-seed{config.seed}"


def _killed_before_first_checkpoint(out: Path) -> bool:
    # Such a run left config.json and an empty metrics.jsonl; resuming starts it at epoch 0.
    metrics = out / "metrics.jsonl"
    return (out / "config.json").is_file() and (not metrics.exists() or metrics.stat().st_size == 0)


def check_out_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that holds another run, unless told to."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file, not a folder; pass a folder for the run")
    if resume:
        if not (out / ckpt.CHECKPOINT_NAME).is_file() and not _killed_before_first_checkpoint(out):
            raise UserInputError(f"--resume given but {out} holds no checkpoint; drop --resume to start a new run")
        return
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write the run folder {out}: {existing} is not writable; pass another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserInputError(
                f"{out} already holds files; pass --resume to continue it or --overwrite to replace it"
            )
        if not ((out / "config.json").is_file() or (out / ckpt.CHECKPOINT_NAME).is_file()):
            # --overwrite deletes the folder: only ever one that a run wrote.
            raise UserInputError(
                f"--overwrite refused: {out} holds files but no run (no config.json); pass another --out"
            )


# --- RNG state ------------------------------------------------------------------------
def _rng_state(shuffle: torch.Generator) -> dict:
    # numpy's state holds an ndarray, which weights_only loading refuses: store a tensor.
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "shuffle": shuffle.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- evaluation -----------------------------------------------------------------------
def evaluate(model, guide, data: Dataset, num_particles: int = 1) -> dict:
    """Mean ELBO terms and clustering metrics on the test split."""
    terms = elbo_terms_dataset(model, guide, data.x_test, num_particles)
    out = {name: float(value.mean()) for name, value in terms.items()}
    probs = cluster_probs(model, guide, data.x_test)
    out.update(clustering_metrics(probs, data.labels_test))
    return out


# --- the run --------------------------------------------------------------------------
def initialize(
    model,
    guide,
    data: Dataset,
    x_train: torch.Tensor,
    config: Config,
    shuffle: torch.Generator,
    progress: bool,
    build=None,
) -> dict:
    """``--init vae-kmeans|vae-umap``: pretrain the x-path as a VAE, seat the components on a
    partition of its latent means, and with ``config.init_fit_epochs`` > 0 fit the GMVAE to it.

    With ``config.init_restarts`` R > 1, R starts are made (the first from ``model`` and
    ``guide`` as given, the others from ``build()``, which returns a fresh model and guide on
    the training device), each is probed (:func:`~pyro_gmvae.initialization.probe_start`)
    and the one with the lowest objective is loaded into ``model`` and ``guide``.

    Returns the record written to ``init.json``: pretraining losses, the k-means objective,
    the fit's losses and cross-entropies, and the test metrics of the kept start before any
    GMVAE training, and with R > 1 one such record per start (with its probe score; the test
    metrics there are reported, never used to choose).  ``x_train`` is ``data.x`` already on the training device.
    """
    t0 = time.perf_counter()
    restarts = config.init_restarts
    if restarts > 1 and build is None:
        raise ValueError("initialize: init_restarts > 1 needs build()")
    records, best, best_pair = [], None, None
    for restart in range(restarts):
        m, g = (model, guide) if restart == 0 else build()
        losses = pretrain_vae(
            m, g, x_train, config.pretrain_epochs, config.batch_size, config.pretrain_lr, shuffle, progress=progress
        )
        if not all(math.isfinite(v) for v in losses):
            raise NonFiniteLossError(f"VAE pretraining diverged (losses per epoch {losses}); lower --pretrain-lr")
        seated = seat_components(m, g, x_train, config.seed + restart, method=PARTITIONS[config.init])
        record = {"pretrain_loss": losses, "kmeans_inertia": seated["inertia"]}
        if config.init_fit_epochs > 0:
            record["fit"] = fit_to_partition(
                m,
                g,
                x_train[: len(seated["assignments"])],
                seated["assignments"],
                config.init_fit_epochs,
                config.batch_size,
                config.pretrain_lr,
                config.init_fit_weight,
                config.mc_samples,
                shuffle,
                progress=progress,
            )
            if not all(math.isfinite(v) for v in record["fit"]["loss"]):
                raise NonFiniteLossError(f"the fit to the partition diverged ({record['fit']}); lower --pretrain-lr")
        if restarts > 1:
            probe = probe_start(
                m,
                g,
                x_train,
                config.init_probe_epochs,
                config.batch_size,
                config.lr,
                config.mc_samples,
                shuffle,
                progress=progress,
            )
            finite = math.isfinite(probe["loss"])  # a diverged probe (inf) is never kept
            record.update(
                probe_loss=probe["loss"] if finite else None,  # None: diverged (JSON has no inf)
                probe_cluster_entropy=probe["cluster_entropy"] if finite else None,
            )
            if finite and (best is None or probe["loss"] < records[best]["probe_loss"]):
                best, best_pair = restart, (m, g)  # the seated start: the probe trained copies
        record["test_at_init"] = evaluate(m, g, data)
        records.append(record)
        logger.info("start %d of %d: %s", restart + 1, restarts, record)
    if restarts > 1 and best is None:
        raise NonFiniteLossError(f"the probes of all {restarts} starts diverged; lower --lr")
    if best:  # start 0 was made in model and guide themselves
        model.load_state_dict(best_pair[0].state_dict())
        guide.load_state_dict(best_pair[1].state_dict())
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
    }
    if restarts > 1:
        out.update(restarts=records, chosen=best, probe_epochs=config.init_probe_epochs)
    logger.info("initialised (%s): %s", config.init, out)
    return out


def epoch_lr(config: Config, epoch: int) -> float:
    """Learning rate of ``epoch`` (1-based): constant, or cosine from lr to lr_final.

    A function of the epoch and ``--epochs`` alone, so a run resumed with the same ``--epochs``
    follows the same schedule; resuming with a larger ``--epochs`` stretches the rest of it.
    """
    if config.lr_final is None:
        return config.lr
    progress = (epoch - 1) / max(1, config.epochs - 1)
    return config.lr_final + 0.5 * (config.lr - config.lr_final) * (1 + math.cos(math.pi * progress))


def warmup_recon_boost(config: Config, epoch: int) -> float:
    """KL warm-up: beta = epoch / (kl_warmup + 1) for the first ``kl_warmup`` epochs, then 1.

    Returns the model's ``recon_boost`` c = (1 - beta) / beta (0 once beta reaches 1).
    """
    if epoch > config.kl_warmup:
        return 0.0
    beta = epoch / (config.kl_warmup + 1)
    return (1 - beta) / beta


def _versions() -> dict:
    import platform

    import pyro_gmvae

    return {
        "pyro_gmvae": pyro_gmvae.__version__,
        "pyro": pyro.__version__,
        "torch": str(torch.__version__),  # TorchVersion is refused by weights_only loading
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    ckpt.atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def _nonfinite_report(model, guide, y: torch.Tensor) -> str:
    """Name the input or the ELBO terms that went non-finite on a batch."""
    if not torch.isfinite(y).all():
        return "the input batch holds NaN or infinite values"
    with torch.no_grad(), pyro.validation_enabled(False):  # report NaN instead of raising on it
        terms = elbo_terms(model, guide, y)
    bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
    if bad:
        return "non-finite terms: " + ", ".join(bad)
    return "the loss is finite but a gradient is not"


def train(
    config: Config,
    resume: bool = False,
    overwrite: bool = False,
    data: Dataset | None = None,
    make_figures: bool = True,
) -> RunResult:
    """Train a GMVAE run as described by ``config`` and write its run folder.

    Parameters
    ----------
    config : Config
        Options; ``None`` entries are filled from the data preset.
    resume : bool
        Continue the run in ``config.out`` from its checkpoint; ``config.epochs`` is the total.
    overwrite : bool
        Replace whatever ``config.out`` holds.
    data : Dataset, optional
        Use these arrays instead of loading ``config.data``.
    make_figures : bool
        Write ``figures/*.png`` at the end.
    """
    pyro.settings.set(module_local_params=True)
    config = config.resolved()
    validate_config(config)
    device = resolve_device(config.device)
    info = distributed.init(device)  # under torchrun: RANK, WORLD_SIZE, LOCAL_RANK
    device = distributed.local_device(info, device)
    distributed.per_rank_batch(config.batch_size, info)  # --batch-size is the global batch
    out = Path(config.out) if config.out else default_out(config)
    config.out = str(out)
    check_out_folder(out, resume, overwrite)
    distributed.barrier(info)  # every rank has checked the folder before rank 0 writes to it
    state = None
    if resume and (out / ckpt.CHECKPOINT_NAME).is_file():
        state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME, required=RESUME_KEYS)
        check_compatible(state["config"], config)
        if config.epochs < state["epoch"]:
            raise UserInputError(
                f"--epochs is the total: the run in {out} already trained {state['epoch']} epochs, "
                f"so --epochs {config.epochs} would train none; pass a larger --epochs"
            )
    data = prepare_data(config, data)
    if state is not None and tuple(state["data_shape"]) != data.data_shape:
        raise UserInputError(
            f"the checkpoint in {out} was trained on examples of shape {tuple(state['data_shape'])}, "
            f"the data now have {data.data_shape}; resume with the same data"
        )

    pyro.set_rng_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    model, guide = build_model_and_guide(config, data.data_shape)
    model.to(device)
    guide.to(device)
    x_train = data.x.to(device)
    init_record = None
    if state is None and config.init != "random":
        # Before DDP wraps the model: every rank pretrains alike (same seed, same data) and
        # DDP's broadcast from rank 0 makes the starts identical in any case.
        show = config.progress and info.is_main

        def build():
            m, g = build_model_and_guide(config, data.data_shape)
            return m.to(device), g.to(device)

        init_record = initialize(model, guide, data, x_train, config, shuffle, progress=show, build=build)
    loss_fn = make_elbo(config.mc_samples)(model, guide)
    step_loss = distributed.wrap(loss_fn, info, device)  # DDP over the ELBO module, or loss_fn
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=config.lr)
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], shuffle)
        history = list(state["history"])
        start_epoch = state["epoch"]
    elif overwrite and out.exists() and info.is_main:
        shutil.rmtree(out)
    if info.enabled:  # same init on every rank; Monte Carlo noise of its own per rank
        pyro.set_rng_seed(distributed.rank_seed(config.seed, info.rank, start_epoch))
    if info.is_main:  # only rank 0 writes the run folder
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserInputError(f"cannot create the run folder {out} ({err.strerror}); pass another --out") from None
        ckpt.remove_stale_temporaries(out)  # left by a run killed while writing
        ckpt.atomic_write_text(out / "config.json", json.dumps({**config.to_dict(), "versions": _versions()}, indent=2))
        # The checkpoint is the record: metrics.jsonl is rewritten from it, so a run killed
        # between the two files never shows an epoch that the checkpoint does not hold.
        _write_jsonl(out / "metrics.jsonl", history)
        if init_record is not None:
            ckpt.atomic_write_text(out / INIT_NAME, json.dumps(init_record, indent=2))

    num_train = len(x_train)
    batch_size = config.batch_size
    steps_per_epoch = num_train // batch_size  # drop the ragged last batch: BatchNorm needs > 1
    elapsed = history[-1]["elapsed"] if history else 0.0
    bar = tqdm(
        total=(config.epochs - start_epoch) * steps_per_epoch,
        disable=not config.progress or not info.is_main,
        desc=f"{config.data} K={config.K}",
        unit="step",
        mininterval=0.5,
    )
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:  # set every epoch, so a --lr given on resume takes effect
            group["lr"] = epoch_lr(config, epoch)
        model.recon_boost = warmup_recon_boost(config, epoch)
        model.train()
        guide.train()
        perm = torch.randperm(num_train, generator=shuffle).to(device)
        total = torch.zeros((), device=device)
        bad_step = torch.full((), -1, device=device, dtype=torch.long)
        for step in range(steps_per_epoch):
            y = x_train[distributed.shard(perm, step, batch_size, info)]  # this rank's slice
            try:
                loss = step_loss(y) / len(y)  # DDP averages over ranks: the global batch mean
            except ValueError as err:
                # Pyro validates distribution parameters (on by default): NaN there raises
                # before the guard below could see it.  Report it the same way.
                if "found invalid values" not in str(err):
                    raise
                loss = torch.full((), math.nan, device=device)
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in loss_fn.parameters() if p.grad is not None])
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
            # Checked before every optimiser step, so a non-finite gradient never reaches the
            # weights.  One host sync per step; TraceEnum_ELBO's own NaN warning syncs anyway.
            if int(bad_step) >= 0:
                bar.close()
                first = int(bad_step)
                y_bad = x_train[distributed.shard(perm, first, batch_size, info)]
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at epoch {epoch}, step {first + 1}: "
                    f"{_nonfinite_report(model, guide, y_bad)}; the last good checkpoint "
                    f"(epoch {start_epoch if not history else history[-1]['epoch']}) in {out} is intact"
                )
            optimizer.step()
            total += loss.detach()
            bar.update(1)
        train_seconds = time.perf_counter() - t0
        train_loss = float(distributed.all_reduce_mean(total, info)) / steps_per_epoch
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "kl_weight": 1 / (1 + model.recon_boost)}
        row["train_loss"] = train_loss
        if not info.is_main:  # rank 0 evaluates and writes the run folder
            continue
        row.update({f"test_{k}" if k in ("elbo", "loss") else k: v for k, v in evaluate(model, guide, data).items()})
        elapsed += train_seconds
        row.update(seconds=train_seconds, elapsed=elapsed)
        history.append(row)
        bar.set_postfix(
            loss=f"{row['train_loss']:.3f}",
            **({"acc": f"{row['acc_hungarian']:.3f}"} if "acc_hungarian" in row else {}),
        )
        ckpt.save_checkpoint(
            out / ckpt.CHECKPOINT_NAME,
            {
                "config": config.to_dict(),
                "data_shape": list(data.data_shape),
                "model": model.state_dict(),
                "guide": guide.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(shuffle),
                "epoch": epoch,
                "history": history,
                "versions": _versions(),
            },
        )
        _append_jsonl(out / "metrics.jsonl", row)
        logger.info("epoch %d: %s", epoch, row)
    bar.close()
    if not info.is_main:
        distributed.shutdown(info)
        return RunResult(out, config, model, guide, history, {})

    final = final_metrics(history)
    ckpt.atomic_write_text(out / "metrics.json", json.dumps(final, indent=2))
    if make_figures:
        from pyro_gmvae.plots import make_run_figures

        make_run_figures(out, model, guide, data, history)
    distributed.shutdown(info)
    return RunResult(out, config, model, guide, history, final)


def final_metrics(history: list[dict]) -> dict:
    """The ``metrics.json`` summary from the last epoch's evaluation."""
    last = history[-1]
    final = {key: last.get(key) for key in FINAL_KEYS}
    final.update(elbo=last["test_elbo"], epochs=last["epoch"], seconds=last["elapsed"])
    return final


def check_compatible(saved: dict, config: Config) -> None:
    """A checkpoint only fits a config with the same architecture; say which option differs."""
    diffs = [
        f"--{k.replace('_', '-')} {getattr(config, k)!r} but the checkpoint has {saved.get(k)!r}"
        for k in ARCHITECTURE_KEYS
        if saved.get(k) != getattr(config, k)
    ]
    if diffs:
        raise UserInputError(
            "cannot resume: " + "; ".join(diffs) + "; drop these flags to resume, or start a new run in another --out"
        )
