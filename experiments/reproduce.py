"""Multi-seed MNIST reproduction benchmark: a grid of settings over several seeds.

    python experiments/reproduce.py --grid smoke                 # minutes: wiring check
    python experiments/reproduce.py --grid k10 --seeds 5 --epochs 10
    python experiments/reproduce.py --grid levers --train-subset 10000 --epochs 3
    python experiments/reproduce.py --grid k16 --seeds 3
    python experiments/reproduce.py --grid scratch --only 1 --seeds 3 --jobs 2   # 2 cells at once, 1 thread each
    python experiments/reproduce.py --grid paper --device cuda   # K 10/16/30 x M 1/10 x v1/v2

Every (setting, seed) cell trains into its own run folder
``experiments/results/runs/<grid>/<setting>-e<epochs>-s<seed>`` through ``pyro_gmvae.train``; a cell
whose ``metrics.json`` exists is read, not retrained, and one with only a checkpoint is
resumed, so an interrupted benchmark continues where it stopped.  ``--continue-from E``
starts each new cell as a copy of the finished E-epoch cell of the same setting and seed
and resumes it: with a constant learning rate that is the same run as one trained from
scratch.  Results are merged into ``experiments/results/mnist.json`` (per setting: every
seed's final test metrics and mean, std, best and worst over seeds) and rendered into
``mnist.md`` beside the paper's table (its Table 1).  Metrics are those of the last epoch: no test-set early
stopping.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import git_commit, locked, machine, summary, trained_config

from pyro_gmvae import train
from pyro_gmvae.checkpoint import CHECKPOINT_NAME
from pyro_gmvae.config import Config
from pyro_gmvae.data import load_dataset
from pyro_gmvae.errors import NonFiniteLossError, UserInputError
from pyro_gmvae.training import INIT_NAME

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = (
    "acc_paper", "acc_hungarian", "purity", "nmi", "ari", "clusters_used", "marginal_entropy", "elbo", "acc_supervised",
)  # fmt: skip

# MNIST test accuracy (paper rule) from Dilokthanakul et al. 2016, Table 1.
PAPER = {
    "K=10, M=1": {"best": 87.31, "mean": 77.78, "std": 5.75},
    "K=10, M=10": {"best": 88.54, "mean": 82.31, "std": 3.75},
    "K=16, M=1": {"best": 89.01, "mean": 85.09, "std": 1.99},
    "K=16, M=10": {"best": 96.92, "mean": 87.82, "std": 5.33},
    "K=30, M=1": {"best": 95.84, "mean": 92.77, "std": 1.60},
    "K=30, M=10": {"best": 93.22, "mean": 89.27, "std": 2.50},
}
PAPER_BASELINES = "DEC 84.30 (K=10); AAE 90.45 +- 2.05 (K=16), 95.90 +- 1.13 (K=30)"

# Every option a data preset fills, fixed, so that a change of the mnist preset never
# changes a grid or its cell folders; the other options take Config's defaults.
BASE = dict(
    data="mnist", network="fc", likelihood="bernoulli", hidden_dim=500, x_dim=200, w_dim=150, K=10, lr=1e-3,
    batch_size=256, cv_weight=0.0, kl_warmup=0, init="random", pretrain_epochs=3, init_restarts=1, init_fit_epochs=0,
    augment_weight=0.0, init_anchor_epochs=0,
)  # fmt: skip
_DEFAULTS = (
    "mc_samples", "guide", "z_prior_weight", "free_bits", "init_probe_epochs", "init_fit_weight", "prior",
    "balance_weight", "prior_lr",
)  # fmt: skip
SMALL = dict(hidden_dim=64, x_dim=8, w_dim=8, batch_size=50)
KMEANS = dict(init="vae-kmeans")
UMAP = dict(init="vae-umap", lr=1e-4, cv_weight=2.0)
# The mnist preset's start and its GMVAE phase before --augment-weight joined it (grids
# k10augment, k16augment add it); the baseline of the validation grids.
DEFAULT = dict(UMAP, pretrain_epochs=10, init_fit_epochs=3)

# Each grid: default seeds and epoch budget, and its settings as changes from BASE.  What
# each grid tried and why: experiments/results/grids.md.
GRIDS = {
    "smoke": dict(
        seeds=2, epochs=1, train_subset=500, test_subset=500,
        settings=[SMALL, dict(SMALL, guide="v1"),
                  dict(SMALL, **KMEANS, pretrain_epochs=1, init_restarts=2, init_probe_epochs=1)],
    ),
    "k10": dict(seeds=5, epochs=4, settings=[dict(cv_weight=0.4)]),
    "k10sched": dict(seeds=5, epochs=10, settings=[dict(cv_weight=0.4, lr_final=1e-4)]),
    "k10warmup": dict(seeds=5, epochs=10, settings=[dict(cv_weight=0.4, kl_warmup=3)]),
    "k10long": dict(seeds=5, epochs=30, settings=[dict(cv_weight=0.4, kl_warmup=3, lr_final=1e-4)]),
    "k10init": dict(seeds=5, epochs=10, settings=[dict(KMEANS, cv_weight=0.4), dict(KMEANS, cv_weight=0.4, lr=3e-4)]),
    "k10confident": dict(seeds=5, epochs=10, settings=[dict(cv_weight=2.0, **KMEANS)]),
    "k10m10": dict(seeds=3, epochs=10, settings=[dict(cv_weight=2.0, **KMEANS, mc_samples=10)]),
    "k10restarts": dict(
        seeds=5, epochs=20, settings=[dict(cv_weight=2.0, **KMEANS, init_restarts=4, init_probe_epochs=2)]
    ),
    "k10umap": dict(
        seeds=5, epochs=20,
        settings=[dict(UMAP, pretrain_epochs=10, init_fit_epochs=3), dict(UMAP, init_fit_epochs=3),
                  dict(UMAP, pretrain_epochs=10)],
    ),
    "k16umap": dict(seeds=3, epochs=20, settings=[dict(UMAP, K=16, pretrain_epochs=10, init_fit_epochs=3)]),
    "k16": dict(seeds=3, epochs=4, settings=[dict(K=16, cv_weight=0.4)]),
    "k16warmup": dict(seeds=3, epochs=10, settings=[dict(K=16, cv_weight=0.4, kl_warmup=3)]),
    "k16init": dict(seeds=3, epochs=10, settings=[dict(K=16, cv_weight=0.4, **KMEANS)]),
    "k16confident": dict(seeds=3, epochs=10, settings=[dict(K=16, cv_weight=2.0, **KMEANS)]),
    "levers": dict(
        seeds=1, epochs=3,
        settings=[{}, dict(lr=3e-4), dict(lr=1e-4), dict(lr=1e-4, batch_size=100), dict(lr=1e-3, batch_size=100),
                  dict(guide="v1"), dict(cv_weight=0.4), dict(free_bits=0.5), dict(free_bits=2.0),
                  dict(z_prior_weight=2.0), dict(mc_samples=10)],
    ),
    # Issue 12's levers against the drift of the default's GMVAE phase, one change at a time,
    # chosen on the validation split: python experiments/reproduce.py --grid drift --validation 10000
    "drift": dict(
        seeds=1, epochs=6,
        settings=[DEFAULT, dict(DEFAULT, w_dim=2), dict(DEFAULT, w_dim=2, cv_weight=10.0),
                  dict(DEFAULT, x_dim=10, w_dim=2), dict(DEFAULT, w_dim=2, prior="tied"),
                  dict(DEFAULT, w_dim=2, init_fit_epochs=0), dict(DEFAULT, x_dim=10, w_dim=2, cv_weight=10.0)],
    ),
    # The batch-balance term (gamma KL(batch mean of p(z|x,w) || pi)) against the drift's
    # growing clusters: python experiments/reproduce.py --grid balance --validation 10000
    "balance": dict(
        seeds=1, epochs=6, settings=[dict(DEFAULT, balance_weight=g) for g in (10.0, 100.0, 300.0, 1000.0)]
    ),
    # The prior network's own learning rate against the drift: the mixture refitted faster
    # than the embedding moves (lr 1e-4 / prior 1e-3), or to a nearly fixed embedding (lr 1e-5 /
    # prior 1e-4): python experiments/reproduce.py --grid priorlr --validation 10000
    "priorlr": dict(seeds=1, epochs=6, settings=[dict(DEFAULT, prior_lr=1e-3), dict(DEFAULT, lr=1e-5, prior_lr=1e-4)]),
    # The v1 guide (z from a classifier head q(z|y) on the image, not from Bayes' rule in the
    # mixture) from the default's start, against the drift: python experiments/reproduce.py
    # --grid guide --validation 10000
    "guide": dict(seeds=1, epochs=6, settings=[dict(DEFAULT, guide="v1")]),
    # The augmentation-consistency term (an image and a moved copy share a cluster) in the
    # default's GMVAE phase, its weight and epochs chosen on the validation split:
    # python experiments/reproduce.py --grid augment --validation 10000
    "augment": dict(seeds=1, epochs=20, settings=[dict(DEFAULT, augment_weight=10.0)]),
    # Weight 10 held the start without adding to it: stronger weights, 10 epochs each.
    "augmentmore": dict(seeds=1, epochs=10, settings=[dict(DEFAULT, augment_weight=a) for a in (30.0, 100.0)]),
    # Weight 100 with the learning rate decayed (cosine) to 1e-5 over 20 epochs: against the
    # epoch-to-epoch swings of the accuracy at a constant rate (validation split).
    "augmentdecay": dict(seeds=1, epochs=20, settings=[dict(DEFAULT, augment_weight=100.0, lr_final=1e-5)]),
    # The default with the augmentation-consistency term at the weight and epochs the
    # validation split chose (grids augment, augmentmore: weight 100 was highest at epoch 10),
    # scored once on the test split, K = 10 and K = 16.
    "k10augment": dict(seeds=5, epochs=10, settings=[dict(DEFAULT, augment_weight=100.0)]),
    "k16augment": dict(seeds=3, epochs=10, settings=[dict(DEFAULT, K=16, augment_weight=100.0)]),
    # The k10augment default with the fit's cross-entropy to the start's partition kept through
    # the first 3 GMVAE epochs, its weight falling 7.5, 5, 2.5 (--init-anchor-epochs): against
    # the first epoch's drop that seeds 0, 3 and 4 of k10augment showed; validation split,
    # 3 seeds, against grid augmentmore's weight-100 cell over the same seeds.
    "anchor": dict(seeds=3, epochs=10, settings=[dict(DEFAULT, augment_weight=100.0, init_anchor_epochs=3)]),
    # That setting (the mnist default since) scored once on the test split.
    "k10anchor": dict(seeds=5, epochs=10, settings=[dict(DEFAULT, augment_weight=100.0, init_anchor_epochs=3)]),
    "k16anchor": dict(seeds=3, epochs=10, settings=[dict(DEFAULT, K=16, augment_weight=100.0, init_anchor_epochs=3)]),
    # --labels from the default's start (its clusters numbered by the labelled classes):
    # label weight and epochs chosen on the validation split, then the semisup grid.
    "semisupval": dict(
        seeds=1, epochs=6,
        settings=[dict(DEFAULT, labels=n, label_weight=w) for n in (100, 3000) for w in (1.0, 50.0)],
    ),
    # Self-training (issue 12): the default's start, then its own 3000 or 10000 most confident
    # assignments observed as z at the label weight that held true labels (semisupval).
    "selftrain": dict(
        seeds=1, epochs=6, settings=[dict(DEFAULT, pseudo_labels=n, label_weight=50.0) for n in (3000, 10000)]
    ),
    # K = 30 with --adam-kernel fused (the same Adam update through torch's fused CPU kernel,
    # other float32 rounding) and --flush-denormal (without it, epochs slow down on denormal
    # floats: 48.9 s at epoch 1, 166.5 s at epoch 8 in results/denormal.json), so that a cell
    # fits in a session; K = 10 and 16 ran with neither.
    "scratch": dict(
        seeds=5, epochs=150,
        settings=[dict(K=10, lr=1e-4, batch_size=100), dict(K=16, lr=1e-4, batch_size=100),
                  dict(K=30, lr=1e-4, batch_size=100, adam_kernel="fused", flush_denormal=True)],
    ),
    "paper": dict(
        seeds=5, epochs=100,
        settings=[dict(K=k, mc_samples=m, guide=g) for k in (10, 16, 30) for m in (1, 10) for g in ("v2", "v1")],
    ),
    # --labels N (each seed is another label draw); experiments/semisupervised.py runs it and
    # writes results/semisupervised.json.  The default's start, numbered by the labelled
    # classes, then one epoch at label weight 50: chosen on the validation split (grid
    # semisupval, mnist_val.json), where weight 50 held 3000 labels at 96.4-96.7 % for six
    # epochs (weight 1: 95.5 falling to 95.0) and 100 labels fell from 94.2 % after epoch 1.
    "semisup": dict(
        seeds=3, epochs=1, settings=[dict(DEFAULT, labels=n, label_weight=50.0) for n in (100, 600, 1000, 3000)]
    ),
}  # fmt: skip


def grid_settings(name: str) -> list[dict]:
    """The grid's settings as complete dicts of Config fields (BASE, the defaults, the changes)."""
    resolved = Config(data="mnist").resolved()  # options without a preset value resolve to their defaults
    defaults = {key: getattr(resolved, key) for key in _DEFAULTS}
    return [{**BASE, **defaults, **changes} for changes in GRIDS[name]["settings"]]


def setting_name(s: dict, train_subset: int | None, validation: int | None = None) -> str:
    name = (
        f"K{s['K']}-M{s['mc_samples']}-{s['guide']}-{s['network']}H{s['hidden_dim']}-lr{s['lr']:g}"
        f"-b{s['batch_size']}-cv{s['cv_weight']:g}-eta{s['z_prior_weight']:g}-fb{s['free_bits']:g}"
    )
    if s.get("kl_warmup"):
        name += f"-warm{s['kl_warmup']}"
    if s.get("init", "random") != "random":
        name += f"-{s['init']}{s['pretrain_epochs']}"
        if s.get("init_restarts", 1) > 1:
            name += f"x{s['init_restarts']}p{s['init_probe_epochs']}"
        if s.get("init_fit_epochs", 0) > 0:
            name += f"f{s['init_fit_epochs']}w{s['init_fit_weight']:g}"
        if s.get("init_anchor_epochs"):
            name += f"a{s['init_anchor_epochs']}"
    if s.get("lr_final") is not None:
        name += f"-cos{s['lr_final']:g}"
    if s["x_dim"] != BASE["x_dim"] or s["w_dim"] != BASE["w_dim"]:
        name += f"-x{s['x_dim']}w{s['w_dim']}"
    if s.get("prior", "uniform") != "uniform":
        name += f"-{s['prior']}"
    if s.get("balance_weight"):
        name += f"-bal{s['balance_weight']:g}"
    if s.get("prior_lr") is not None:
        name += f"-plr{s['prior_lr']:g}"
    if s.get("augment_weight"):
        name += f"-aug{s['augment_weight']:g}"
    if s.get("labels"):
        name += f"-labels{s['labels']}w{s.get('label_weight', 1.0):g}"
    if s.get("pseudo_labels"):
        name += f"-pseudo{s['pseudo_labels']}w{s.get('label_weight', 1.0):g}"
    if s.get("adam_kernel", "auto") != "auto":
        name += f"-adam{s['adam_kernel']}"
    if s.get("flush_denormal"):
        name += "-ftz"
    return name + (f"-n{train_subset}" if train_subset else "") + (f"-val{validation}" if validation else "")


def continue_cell(source: Path, out: Path) -> None:
    """Start ``out`` as a copy of the finished shorter cell ``source`` (``--continue-from``)."""
    if not (source / "metrics.json").is_file() or not (source / CHECKPOINT_NAME).is_file():
        raise UserInputError(f"--continue-from: {source} is not a finished cell (no metrics.json or checkpoint)")
    shutil.copytree(source, out)


def run_cell(setting: dict, seed: int, epochs: int, out: Path, args, source: Path | None = None) -> dict:
    """Train (or resume, or read) one (setting, seed) cell; return its final metrics.

    ``source``: a finished cell of the same setting and seed with fewer epochs; a new cell
    starts as a copy of it and resumes (``--continue-from``).
    """
    done = out / "metrics.json"
    if source is not None and not out.exists():
        continue_cell(source, out)
        print(f"  {out.name}: continuing {source.name}", flush=True)
    if done.is_file() and json.loads(done.read_text()).get("epochs", 0) >= epochs:
        print(f"  {out.name}: done, read")
    else:
        config = Config(
            **setting,
            seed=seed,
            epochs=epochs,
            out=str(out),
            device=args.device,
            progress=False,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            validation=args.validation,
            data_root=args.data_root,
        )
        resume = (out / CHECKPOINT_NAME).is_file()
        print(f"  {out.name}: {'resuming' if resume else 'training'} to {epochs} epochs", flush=True)
        if args.threads:  # every cell at --threads, whatever an earlier cell's libraries set
            torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        # One load of MNIST for the whole grid; train() slices its own shallow copy.
        if args.cache is None:
            args.cache = load_dataset("mnist", args.data_root)
        train(config, resume=resume, overwrite=not resume, data=dataclasses.replace(args.cache))
        print(f"  {out.name}: {time.perf_counter() - t0:.0f} s", flush=True)
        (out / "machine.json").write_text(json.dumps(machine(args.device)))
        (out / "commit.json").write_text(json.dumps(git_commit()))
    final = json.loads(done.read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    final["marginal_entropy"] = history[-1].get("marginal_entropy")
    final["acc_hungarian_per_epoch"] = [round(row["acc_hungarian"], 4) for row in history]
    final["acc_paper_per_epoch"] = [round(row["acc_paper"], 4) for row in history]
    if (out / INIT_NAME).is_file():  # --init: the test metrics of the start, before epoch 1
        record = json.loads((out / INIT_NAME).read_text())
        start = record["test_at_init"]
        final["at_init"] = {k: start[k] for k in ("acc_paper", "acc_hungarian", "nmi") if k in start}
        if "restarts" in record:  # --init-restarts: every start's probe score and test accuracy
            final["chosen_start"] = record["chosen"]
            final["starts"] = [
                {"probe_loss": r["probe_loss"], **{k: r["test_at_init"][k] for k in ("acc_paper", "acc_hungarian")}}
                for r in record["restarts"]
            ]
    final["seed"] = seed
    # The code and the full resolved options that made this cell (absent for cells trained
    # before they were recorded; see the setting's "provenance").
    final["commit"] = json.loads((out / "commit.json").read_text()) if (out / "commit.json").is_file() else None
    final["resolved_config"] = trained_config(json.loads((out / "config.json").read_text()))
    # The machine that trained this cell (absent for cells trained before it was recorded).
    final["machine"] = json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else None
    return final


def _stats(values: list[float]) -> dict:
    return summary(values, low="worst", high="best")


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for key in (*METRICS, "seconds", "epochs"):
        values = [r[key] for r in per_seed if r.get(key) is not None]
        if values:
            out[key] = _stats(values)
    # --init runs: the seated model's test metrics before the first GMVAE epoch.
    starts = [r["at_init"] for r in per_seed if r.get("at_init")]
    for key in ("acc_paper", "acc_hungarian") if starts else ():
        out[f"{key}_at_init"] = _stats([start[key] for start in starts])
    out["num_seeds"] = len(per_seed)
    return out


def paper_key(setting: dict) -> str | None:
    key = f"K={setting['K']}, M={setting['mc_samples']}"
    return key if key in PAPER else None


def _percent_cell(m: dict) -> str:
    """mean +- std [worst, best] of a summarised fraction, in percent."""
    return f"{100 * m['mean']:.1f} +- {100 * m['std']:.1f} [{100 * m['worst']:.1f}, {100 * m['best']:.1f}]"


def write_markdown(results: dict, path: Path, validation: int | None = None) -> None:
    pct = ("acc_paper", "acc_hungarian", "purity", "nmi", "ari")
    lines = [
        "# MNIST clustering: multi-seed results",
        "",
        f"Generated by `experiments/reproduce.py` from `{path.with_suffix('.json').name}`; do not edit by hand. "
        + (
            f"Validation split: the last {validation} training images (the test split is not read; "
            "settings are chosen here), "
            if validation
            else "Test split (10,000 images unless the images column says otherwise), "
        )
        + "metrics after the last epoch of each "
        "run (no early stopping on the test set). Cells are mean +- std over seeds, with "
        "[worst, best]; accuracies, purity, NMI and ARI in percent.",
        "",
        "| grid | setting | seeds | epochs | train / test images | "
        + " | ".join(pct)
        + " | clusters used | s / run | paper (rule) mean +- std [best] |",
        "|" + "---|" * (len(pct) + 8),
    ]
    for name, entry in sorted(results["settings"].items(), key=lambda kv: (kv[1]["grid"], kv[0])):
        s = entry["summary"]
        cells = [_percent_cell(s[key]) for key in pct]
        used = s["clusters_used"]
        paper = PAPER.get(entry["paper_key"] or "")
        paper_cell = f"{paper['mean']} +- {paper['std']} [{paper['best']}]" if paper else "-"
        lines.append(
            f"| {entry['grid']} | `{name}` | {s['num_seeds']} | {entry['epochs']} | "
            f"{entry['train_subset'] or 60000 - (entry.get('validation') or 0)} / "
            f"{entry['test_subset'] or entry.get('validation') or 10000} | "
            + " | ".join(cells)
            + f" | {used['mean']:.1f} [{used['worst']}, {used['best']}] | {s['seconds']['mean']:.0f} | {paper_cell} |"
        )
    started = {k: v for k, v in results["settings"].items() if "acc_hungarian_at_init" in v["summary"]}
    if started:
        lines += [
            "",
            "Runs with `--init vae-kmeans` or `vae-umap`: test metrics of the start (seated, and fitted with"
            " `--init-fit-epochs`) before the first GMVAE epoch.",
            "",
            "| setting | seeds | paper rule at start | Hungarian at start |",
            "|---|---|---|---|",
        ]
        for name, entry in sorted(started.items()):
            s = entry["summary"]
            cells = [_percent_cell(s[k]) for k in ("acc_paper_at_init", "acc_hungarian_at_init")]
            lines.append(f"| `{name}` | {s['num_seeds']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paper (Dilokthanakul et al. 2016, Table 1; MNIST test accuracy, paper rule, percent):",
        "",
        "| setting | mean +- std | best |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['mean']} +- {v['std']} | {v['best']} |" for k, v in PAPER.items()]
    lines += ["", f"Baselines quoted there: {PAPER_BASELINES}.", "", "Machines (grids: machine):", ""]
    machines: dict[str, set] = {}
    for entry in results["settings"].values():
        m = entry["machine"]
        text = (
            f"{m['device']}, {m['platform']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
            f"torch {m['torch']}"
        )
        machines.setdefault(text, set()).add(entry["grid"])
    lines += [f"- {', '.join(sorted(grids))}: {text}" for text, grids in machines.items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="smoke")
    p.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the grid's)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="epoch budget per run (default: the grid's)")
    p.add_argument("--train-subset", type=int, help="first N training images only (quick checks)")
    p.add_argument("--test-subset", type=int, help="first N test images only (quick checks)")
    p.add_argument("--only", type=int, nargs="*", help="indices of the grid's settings to run")
    p.add_argument(
        "--validation",
        type=int,
        metavar="N",
        help="score on the last N training images instead of the test split (choosing settings); "
        "results go to mnist_val.json / mnist_val.md",
    )
    p.add_argument(
        "--continue-from",
        type=int,
        metavar="EPOCHS",
        help="start each new cell from the finished cell of the same setting and seed with this "
        "smaller budget (its folder is copied, then resumed); settings with --lr-final are refused",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many cells at once, each in its own process at --threads (default 1 there); "
        "on 2 cores, 2 jobs at 1 thread train two seeds in about the time one takes at 2 threads",
    )
    p.add_argument("--data-root")
    p.add_argument("--results", default=str(RESULTS), help="folder for mnist.json, mnist.md and runs/")
    args = p.parse_args(argv)
    args.cache = None
    grid = GRIDS[args.grid]
    args.train_subset = args.train_subset or grid.get("train_subset")
    args.test_subset = args.test_subset or grid.get("test_subset")
    epochs = args.epochs or grid["epochs"]
    seeds = range(args.first_seed, args.first_seed + (args.seeds or grid["seeds"]))
    results_dir = Path(args.results)
    runs = results_dir / "runs" / args.grid
    json_path = results_dir / ("mnist_val.json" if args.validation else "mnist.json")
    md_path = json_path.with_suffix(".md")
    every = grid_settings(args.grid)
    indices = [i for i in range(len(every)) if args.only is None or i in args.only]
    settings = [every[i] for i in indices]
    if args.jobs > 1:
        return run_jobs(args, indices, seeds)

    if args.continue_from is not None:
        # A constant learning rate makes the resumed cell the same run as one trained from
        # scratch (tests/test_reproduce.py); a cosine schedule would be stretched instead.
        if not 0 < args.continue_from < epochs:
            raise SystemExit(f"error: --continue-from must be between 1 and --epochs - 1 ({epochs - 1})")
        if any(s.get("lr_final") is not None for s in settings):
            raise SystemExit("error: --continue-from needs a constant learning rate; this grid sets --lr-final")

    for setting in settings:
        stem = setting_name(setting, args.train_subset, args.validation)
        name = f"{stem}-e{epochs}"
        print(f"{args.grid} / {name}: seeds {list(seeds)}", flush=True)
        per_seed = []
        for seed in seeds:
            try:
                source = None if args.continue_from is None else runs / f"{stem}-e{args.continue_from}-s{seed}"
                per_seed.append(run_cell(setting, seed, epochs, runs / f"{name}-s{seed}", args, source))
            except (UserInputError, NonFiniteLossError) as err:
                print(f"  seed {seed}: error: {err}", file=sys.stderr)
                per_seed.append({"seed": seed, "error": str(err)})
        finished = [r for r in per_seed if "error" not in r]
        with locked(results_dir / "runs" / json_path.name):  # several processes may share the file (--jobs)
            write_results(args, name, setting, epochs, per_seed, json_path, md_path)
        if finished:
            h = summarise(finished)["acc_hungarian"]
            print(
                f"  acc_hungarian {100 * h['mean']:.1f} +- {100 * h['std']:.1f} over {len(finished)} seeds", flush=True
            )
    return 0


def write_results(args, name: str, setting: dict, epochs: int, per_seed: list, json_path: Path, md_path: Path) -> None:
    """Merge one setting's cells into the results file (re-read just before writing) and render the table."""
    results = json.loads(json_path.read_text()) if json_path.is_file() else {"settings": {}}
    entry = results["settings"].get(name, {"per_seed": []})
    merged = {r["seed"]: r for r in entry["per_seed"]}
    merged.update({r["seed"]: r for r in per_seed})
    per_seed_all = [merged[k] for k in sorted(merged)]
    ok = [r for r in per_seed_all if "error" not in r]
    results["settings"][name] = {
        "grid": args.grid,
        "config": setting,
        "epochs": epochs,
        "train_subset": args.train_subset,
        "test_subset": args.test_subset,
        "validation": args.validation,
        "paper_key": paper_key(setting),
        "resolved_config": next(
            (r["resolved_config"] for r in ok if r.get("resolved_config")), entry.get("resolved_config")
        ),
        "provenance": entry.get("provenance"),
        "machine": next((r["machine"] for r in ok if r.get("machine")), machine(args.device)),
        "per_seed": per_seed_all,
        "summary": summarise(ok) if ok else {},
    }
    results["paper"] = PAPER
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(json_path)
    write_markdown(
        {"settings": {k: v for k, v in results["settings"].items() if v["summary"]}}, md_path, args.validation
    )


def run_jobs(args, indices: list[int], seeds: range) -> int:
    """``--jobs N``: every (setting, seed) cell in a process of its own, N at a time.

    Each child is this script for one cell (``--only i --seeds 1 --first-seed s``) at
    ``--threads`` (1 unless given) with ``OMP_WAIT_POLICY=PASSIVE`` unless set (busy
    OpenMP waits of two processes stall each other on a small machine); the children
    merge their cells into the results file under a lock.  Returns the worst exit status.
    """
    common = ["--grid", args.grid, "--device", args.device, "--results", args.results]
    for flag_name in ("epochs", "train_subset", "test_subset", "validation", "continue_from", "data_root"):
        if getattr(args, flag_name) is not None:
            common += [f"--{flag_name.replace('_', '-')}", str(getattr(args, flag_name))]
    common += ["--threads", str(args.threads or 1)]
    cells = [(i, seed) for i in indices for seed in seeds]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    running: list[subprocess.Popen] = []
    status = 0
    for i, seed in cells:
        while len(running) >= args.jobs:
            status = max(status, _wait_any(running))
        cell = ["--only", str(i), "--seeds", "1", "--first-seed", str(seed)]
        print(f"{args.grid}: setting {i}, seed {seed} in a process of its own", flush=True)
        running.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *common, *cell], env=env))
    while running:
        status = max(status, _wait_any(running))
    return status


def _wait_any(running: list) -> int:
    """Wait until one of ``running`` ends; remove it and return its exit status."""
    while True:
        for proc in running:
            if proc.poll() is not None:
                running.remove(proc)
                return proc.returncode
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
