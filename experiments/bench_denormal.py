"""Denormal floats on the CPU: MNIST from scratch, epoch by epoch, without and with ``--flush-denormal``.

    python experiments/bench_denormal.py                  # K = 30 and K = 10, 8 epochs each way: about 35 min
    python experiments/bench_denormal.py --only 2 --epochs 4

Trains the cells of grid ``scratch`` (``experiments/reproduce.py``: the paper's protocol,
``--init random``, Adam 1e-4, batch 100) from seed 0 for a few epochs, once without
``--flush-denormal`` and once with it, one run after the other at ``--threads``, each in a
new process (as training runs are), and records each epoch's training seconds and test
accuracy.  As training goes on, some values of the backward pass fall below float32's
smallest normal number, 1.2e-38; x86 CPUs compute on such denormal numbers through a slow
path, and a matrix product holding many of them runs many times slower.
``--flush-denormal`` reads and writes them as zero instead.  The two runs compute different
float32 numbers once a denormal occurs, so their accuracies are shown too.  Writes
``results/denormal.json``; the README's table quotes it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import git_commit, machine, trained_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import grid_settings, setting_name  # noqa: E402

from pyro_gmvae import Config, train  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=int, nargs="+", default=[2, 0], help="indices of grid scratch's settings")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", help="folder holding MNIST/raw (default: $PYRO_GMVAE_DATA, then ./data)")
    p.add_argument("--out", default=str(HERE / "results" / "denormal.json"))
    return p.parse_args(argv)


def one_run(setting: dict, flush: bool, args) -> dict:
    """Train one run and return its record; called in a fresh process of its own (see :func:`in_new_process`)."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(**{**setting, "flush_denormal": flush}, seed=args.seed, epochs=args.epochs,
                        out=str(Path(tmp) / "run"), progress=False, data_root=args.data_root)  # fmt: skip
        train(config, make_figures=False)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        resolved = json.loads((Path(tmp) / "run" / "config.json").read_text())
    keep = ("epoch", "seconds", "acc_paper", "acc_hungarian", "train_loss")
    return {
        "flush_denormal": flush,
        "resolved_config": trained_config({k: v for k, v in resolved.items() if k != "versions"}),
        "per_epoch": [{k: row[k] for k in keep} for row in rows],
    }


def in_new_process(setting: dict, flush: bool, args) -> dict:
    """:func:`one_run` in a new process, as a training run is (the CPU's denormal mode is a
    setting of each thread; a fresh process starts every run from the same state)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(one_run, setting, flush, args).result()


def compare(runs: list[dict], last: int = 3) -> dict:
    """Mean seconds of the last ``last`` epochs of each run and their ratio (without / with)."""
    tails = {run["flush_denormal"]: [r["seconds"] for r in run["per_epoch"][-last:]] for run in runs}
    means = {flush: sum(seconds) / len(seconds) for flush, seconds in tails.items()}
    return {
        f"last_{last}_epochs_seconds_without": means[False],
        f"last_{last}_epochs_seconds_with": means[True],
        "ratio_without_over_with": means[False] / means[True],
        "first_epoch_seconds": {str(run["flush_denormal"]).lower(): run["per_epoch"][0]["seconds"] for run in runs},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    settings = grid_settings("scratch")
    report = {
        "command": " ".join(["python experiments/bench_denormal.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine("cpu"),
        "threads": args.threads,
        "git_commit": git_commit(),
        "config": {"only": args.only, "epochs": args.epochs, "seed": args.seed, "threads": args.threads},
        "what": "grid scratch's cells from seed 0, without and with --flush-denormal, one after the other, "
        "each run in a new process",
        "settings": [],
    }
    for index in args.only:
        setting = {k: v for k, v in settings[index].items() if k != "flush_denormal"}
        runs = []
        for flush in (False, True):
            runs.append(in_new_process(setting, flush, args))
            print(f"{setting_name(setting, None)} flush={flush}: "
                  f"{[round(r['seconds'], 1) for r in runs[-1]['per_epoch']]} s", flush=True)  # fmt: skip
        report["settings"].append({"grid": "scratch", "index": index, "K": setting["K"], "runs": runs,
                                   "comparison": compare(runs)})  # fmt: skip
    report["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
