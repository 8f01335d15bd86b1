"""Test accuracy per epoch of the full-data MNIST settings, from ``results/mnist.json``.

    python experiments/mnist_figure.py            # writes results/figures/mnist/accuracy_per_epoch.png

One panel per K: for each setting, the mean over seeds of the test accuracy after every
epoch (line) and the worst and best seed (band; none with one seed); a marker at epoch 0 shows where
``--init vae-kmeans`` and ``vae-umap`` runs start.  Hungarian accuracy for K = 10, the paper's rule for other
K (one-to-one matching counts K - 10 clusters wrong by construction).  Every point comes
from the committed JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

RESULTS = Path(__file__).resolve().parent / "results"


def metric_for(K: int) -> str:
    return "acc_hungarian" if K == 10 else "acc_paper"


def curves(results: dict, K: int) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(setting, per-seed accuracy per epoch (seeds, epochs), per-seed start or None), full data only."""
    metric = metric_for(K)
    out = []
    for name, entry in sorted(results["settings"].items()):
        if entry["config"]["K"] != K or entry.get("train_subset") or not entry["summary"]:
            continue
        runs = [r for r in entry["per_seed"] if "error" not in r and r.get(f"{metric}_per_epoch")]
        if not runs or len({len(r[f"{metric}_per_epoch"]) for r in runs}) != 1:
            continue
        acc = np.array([r[f"{metric}_per_epoch"] for r in runs])
        start = np.array([r["at_init"][metric] for r in runs]) if all("at_init" in r for r in runs) else None
        out.append((name, acc, start))
    # One curve per setting: drop a shorter budget of the same setting (k10 at 4 and 10 epochs).
    longest: dict[str, tuple] = {}
    for name, acc, start in out:
        stem = name.rsplit("-e", 1)[0]
        if stem not in longest or acc.shape[1] > longest[stem][1].shape[1]:
            longest[stem] = (name, acc, start)
    return list(longest.values())


def plot(results: dict, path: Path) -> Path:
    ks = sorted({e["config"]["K"] for e in results["settings"].values() if not e.get("train_subset")})
    fig = Figure(figsize=(6.5 * len(ks), 5))
    axes = np.atleast_1d(fig.subplots(1, len(ks), squeeze=False)[0])
    for ax, K in zip(axes, ks, strict=True):
        for name, acc, start in curves(results, K):
            epochs = np.arange(1, acc.shape[1] + 1)
            mean = 100 * acc.mean(0)
            if start is not None:  # the seated model before epoch 1
                epochs = np.concatenate([[0], epochs])
                acc = np.concatenate([start[:, None], acc], axis=1)
                mean = 100 * acc.mean(0)
            label = name.removeprefix(f"K{K}-M1-v2-fcH500-")
            (line,) = ax.plot(epochs, mean, label=f"{label} ({len(acc)} seeds)")
            ax.fill_between(epochs, 100 * acc.min(0), 100 * acc.max(0), color=line.get_color(), alpha=0.15)
            if start is not None:
                ax.plot([0], [mean[0]], "o", color=line.get_color())
        what = "Hungarian" if metric_for(K) == "acc_hungarian" else "paper-rule"
        ax.set_title(f"MNIST, K = {K}: {what} test accuracy\n(mean over seeds; band: worst to best seed)")
        ax.set_xlabel("epoch (0: the start of --init vae-* runs)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS / "mnist.json"))
    p.add_argument("--out", default=str(RESULTS / "figures" / "mnist" / "accuracy_per_epoch.png"))
    args = p.parse_args(argv)
    print(plot(json.loads(Path(args.results).read_text()), Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
