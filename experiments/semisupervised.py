"""Semi-supervised MNIST: plain test accuracy with N = 100, 600, 1000, 3000 labels, 3 label draws each.

    python experiments/semisupervised.py --device cuda            # the grid (a GPU session)
    python experiments/semisupervised.py --train-subset 2000 --test-subset 500 --epochs 1 --seeds 1 --only 0

Trains the grid ``semisup`` of ``experiments/reproduce.py`` (``--labels N``; each seed is
another label draw and another start) with its cells, resumable, under
``experiments/results/runs/semisup/``, then writes ``experiments/results/semisupervised.json``:
per N every draw's plain test accuracy (cluster c is class c), their mean and standard
deviation, the unsupervised metrics beside them, and the figure of Pyro's M2 tutorial
(``ss_vae_M2.py``, mean of 5 draws) to compare with.  Runs with a train or test subset
are wiring checks and go to ``semisupervised_subset.json`` instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import reproduce
from common import summary

RESULTS = Path(__file__).resolve().parent / "results"
WORK = RESULTS / "runs" / "semisup"  # reproduce.py's cells and bookkeeping (not committed)
# MNIST test accuracy (percent) of Pyro's semi-supervised VAE tutorial (M2), mean of 5 draws.
M2 = {100: 93.19, 600: 94.37, 1000: 94.87, 3000: 95.82}


def collect(grid_json: Path, train_subset: int | None, test_subset: int | None) -> dict:
    """Per N, from reproduce.py's record of the grid: accuracy per draw, mean and std."""
    settings = json.loads(grid_json.read_text())["settings"]
    by_labels = {}
    for name, entry in settings.items():
        if entry["grid"] != "semisup" or (entry["train_subset"], entry["test_subset"]) != (train_subset, test_subset):
            continue
        draws = [r for r in entry["per_seed"] if r.get("acc_supervised") is not None]
        if not draws:
            continue
        n = entry["config"]["labels"]
        accuracy = [r["acc_supervised"] for r in draws]
        by_labels[str(n)] = {
            "setting": name,
            "epochs": entry["epochs"],
            "accuracy": {
                **summary(accuracy),
                "per_draw": [{"seed": r["seed"], "accuracy": r["acc_supervised"]} for r in draws],
            },
            "acc_hungarian": summary([r["acc_hungarian"] for r in draws]),
            "nmi": summary([r["nmi"] for r in draws]),
            "m2_tutorial_percent": M2.get(n),
            "config": entry["config"],  # the grid's setting
            "resolved_config": entry.get("resolved_config"),
            "commits": sorted({json.dumps(r.get("commit"), sort_keys=True) for r in draws}),
            "machine": entry.get("machine"),
        }
    return dict(sorted(by_labels.items(), key=lambda kv: int(kv[0])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, help="label draws 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the grid's)")
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--only", type=int, nargs="*", help="indices of N in (100, 600, 1000, 3000)")
    p.add_argument("--threads", type=int)
    p.add_argument("--data-root")
    args = p.parse_args(argv)
    forward = ["--grid", "semisup", "--results", str(WORK), "--device", args.device]
    for flag in ("seeds", "epochs", "train_subset", "test_subset", "threads", "data_root"):
        if getattr(args, flag) is not None:
            forward += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.only is not None:
        forward += ["--only", *map(str, args.only)]
    reproduce.main(forward)

    by_labels = collect(WORK / "mnist.json", args.train_subset, args.test_subset)
    subset = args.train_subset is not None or args.test_subset is not None
    out = RESULTS / ("semisupervised_subset.json" if subset else "semisupervised.json")
    record = {
        "what": "MNIST plain test accuracy (cluster c = class c) with N labelled training examples; "
        "mean and std over label draws (seeds), last epoch, no early stopping",
        "train_subset": args.train_subset,
        "test_subset": args.test_subset,
        "m2_tutorial_percent": {str(k): v for k, v in M2.items()},
        "chosen_on": "label weight and epochs chosen on the validation split (the last 10,000 training images): "
        "python experiments/reproduce.py --grid semisupval --validation 10000 (results/mnist_val.json); "
        "the test split is scored once, here",
        "by_labels": by_labels,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'N':>6} {'accuracy %':>18} {'M2 %':>7}")
    for n, entry in by_labels.items():
        acc = entry["accuracy"]
        print(f"{n:>6} {100 * acc['mean']:>9.2f} +- {100 * acc['std']:<5.2f} {entry['m2_tutorial_percent'] or '-':>7}")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
