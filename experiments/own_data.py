"""Own-data benchmark: the ``.npz`` defaults against k-means on seven data sets.

    python experiments/own_data.py                       # all sets, seeds 0 1 2, test split
    python experiments/own_data.py --val                 # score on a validation split instead
    python experiments/own_data.py --only iris wine --seeds 0 1 2
    python experiments/own_data.py --val --only moons --set epochs=50 --tag e50

Each set is saved once as ``<cache>/<name>.npz`` (arrays ``x``, ``labels``, ``x_test``,
``labels_test``; sets without a split get a seeded stratified 70/30 train/test split).
For each set, k-means (scikit-learn, 10 restarts, seeded, K = number of classes) is fitted
on the raw training features and assigns the held-out split; the GMVAE is trained for
every seed exactly as ``python experiments/run.py --data <set>.npz --K K --seed S`` trains
it, with the options ``train`` derives from the file (:func:`pyro_gmvae.autoconfig.npz_defaults`;
features standardised with the training statistics when the Gaussian likelihood is
chosen), and both are scored by Hungarian accuracy on the held-out split.

``--val`` holds out the last 20 % of the TRAINING split as the evaluation split
(``--validation N``) and never scores the test split: settings are chosen there.  Without ``--val`` the test split is
scored; that is the committed table.  Results go to ``experiments/results/own_data.json``
(``own_data_val.json`` with ``--val``), one entry per set (key ``<set>`` or
``<set>:<tag>``); a set already there is skipped unless ``--force``.  Labels are only
used for scoring.
"""

from __future__ import annotations

import os
import sys

# One thread unless --threads says otherwise, fixed before numpy, torch and numba load:
# UMAP's numba start-up otherwise widens torch's OpenMP pool to every core in the middle
# of a run (torch.get_num_threads() went from 1 to 2 after the first partition).
# Only when run as a script: imported (by the tests), it must not change the importer's
# numba, which refuses a second thread count once it has started.
if __name__ == "__main__":
    _THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
    for _name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_name, _THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import git_commit, machine  # noqa: E402

from pyro_gmvae import cluster_probs, train  # noqa: E402
from pyro_gmvae.autoconfig import kmeans_hungarian  # noqa: E402
from pyro_gmvae.config import Config  # noqa: E402
from pyro_gmvae.data import default_data_root  # noqa: E402
from pyro_gmvae.metrics import hungarian_accuracy  # noqa: E402
from pyro_gmvae.training import INIT_NAME  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SETS = ("iris", "wine", "breast_cancer", "moons", "blobs", "aniso", "mnist10k")


def _split(x, labels, seed=0):
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=0.3, stratify=labels, random_state=seed)
    return dict(x=x_tr, labels=y_tr, x_test=x_te, labels_test=y_te)


def make_set(name: str) -> dict:
    """The arrays of one validation set (all seeded, offline)."""
    from sklearn import datasets

    if name in ("iris", "wine", "breast_cancer"):
        bunch = getattr(datasets, f"load_{name}")()
        return _split(bunch.data, bunch.target)
    if name == "moons":  # scikit-learn's clustering comparison, a little noisier
        return _split(*datasets.make_moons(n_samples=1500, noise=0.1, random_state=0))
    if name in ("blobs", "aniso"):  # scikit-learn's "k-means assumptions" demo
        x, y = datasets.make_blobs(n_samples=1500, random_state=170)
        if name == "aniso":
            x = x @ np.array([[0.60834549, -0.63667341], [-0.40887718, 0.85253229]])
        return _split(x, y)
    if name == "mnist10k":  # a seeded subset of real MNIST, grey levels in [0, 1], flattened
        from torchvision.datasets import MNIST

        rng = np.random.default_rng(0)
        out = {}
        for split, size, suffix in ((True, 10000, ""), (False, 2000, "_test")):
            ds = MNIST(default_data_root(), train=split, download=False)
            idx = np.sort(rng.choice(len(ds.data), size, replace=False))
            out["x" + suffix] = ds.data.numpy()[idx].reshape(size, -1).astype(np.float32) / 255.0
            out["labels" + suffix] = ds.targets.numpy()[idx]
        return out
    raise ValueError(f"unknown set {name!r}")


def cached_set(name: str, cache: Path) -> Path:
    path = cache / f"{name}.npz"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        arrays = make_set(name)
        arrays = {k: v.astype(np.int64) if k.startswith("labels") else v for k, v in arrays.items()}
        np.savez(path, **arrays)
    return path


def load_split(path: Path, val: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and evaluation arrays; with ``val`` the evaluation split is the last 20 % of train."""
    with np.load(path) as f:
        x, labels = f["x"], f["labels"]
        if not val:
            return x, labels, f["x_test"], f["labels_test"]
    cut = len(x) - int(round(0.2 * len(x)))
    return x[:cut], labels[:cut], x[cut:], labels[cut:]


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` items: a VALUE that reads as JSON (numbers, true, null, lists) is that, else a string."""
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:  # a word such as fused or partition
            out[key] = value
    return out


def _rel(value):
    """A path inside the repository as a relative one (the JSON is committed)."""
    if isinstance(value, str) and value.startswith(str(HERE.parent) + os.sep):
        return os.path.relpath(value, HERE.parent)
    return value


def run_set(name: str, path: Path, args, overrides: dict) -> dict:
    """Train the set's ``.npz`` file as ``run.py --data PATH.npz --K K --seed S`` would, for every seed."""
    x, labels, x_eval, labels_eval = load_split(path, args.val)
    num_clusters = int(len(np.unique(labels)))  # for scoring and K only, as a user who knows K
    baseline = kmeans_hungarian(x, x_eval, labels_eval, num_clusters)  # raw features
    baseline_train = kmeans_hungarian(x, x, labels, num_clusters) if args.val else None
    entry = {
        "N": int(len(x)),
        "D": int(np.prod(x.shape[1:])),
        "K": num_clusters,
        "split": "validation (last 20% of train)" if args.val else "test",
        "kmeans_hungarian": baseline,
        "overrides": overrides,
        "command": f"python experiments/run.py --data {_rel(str(path))} --K {num_clusters} --seed S"
        + (f" --validation {len(x_eval)}" if args.val else "")
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items()),
        **({"kmeans_train_hungarian": baseline_train} if args.val else {}),
    }
    accs, starts, seconds, train_accs, threads = [], [], [], [], []
    for seed in args.seeds:
        out = Path(args.runs) / ("val" if args.val else "test") / f"{name}-{args.tag or 'default'}-s{seed}"
        validation = {"validation": len(x_eval)} if args.val else {}
        config = Config(
            data=str(path), K=num_clusters, seed=seed, out=str(out), progress=False, **validation, **overrides
        )  # every other option: the .npz defaults that train() derives from the training split
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        result = train(config, overwrite=True, make_figures=False)
        seconds.append(time.perf_counter() - t0)
        threads.append(torch.get_num_threads())  # still --threads at the end of the run?
        accs.append(result.final["acc_hungarian"])
        if args.val:  # clustering of the training part too: a finer signal on tiny sets, still no test data
            data = result.load_data()
            probs = cluster_probs(result.model, result.guide, data.x)
            train_accs.append(hungarian_accuracy(probs.argmax(1).cpu().numpy(), data.labels.numpy()))
        init = out / INIT_NAME
        starts.append(json.loads(init.read_text())["test_at_init"]["acc_hungarian"] if init.is_file() else None)
        if seed == args.seeds[0]:
            entry["config_seed0"] = {k: _rel(v) for k, v in result.config.to_dict().items() if k != "extra"}
        print(f"{name} seed {seed}: {accs[-1]:.4f} (start {starts[-1]}) in {seconds[-1]:.0f}s", flush=True)
    commit = git_commit()  # one read of the work tree: sha and dirty flag from the same moment
    entry.update(
        acc_hungarian=statistics.mean(accs),
        acc_hungarian_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
        acc_hungarian_seeds=accs,
        acc_start_seeds=starts,
        **({"acc_train_hungarian_seeds": train_accs} if args.val else {}),
        seeds=list(args.seeds),
        seconds_per_run=seconds,
        torch_threads_after_run=threads,
        git_commit=commit["sha"],
        git_dirty=commit["dirty"],  # uncommitted changes to tracked files when the set ended
        machine=machine(),
    )
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--val", action="store_true", help="score on the last 20%% of train; never read the test split")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a default (tuning)")
    parser.add_argument("--tag", default="", help="entry suffix for runs with --set")
    parser.add_argument("--out-json", default=None)
    parser.add_argument("--cache", default=str(HERE.parent / "data" / "own_data"))
    parser.add_argument("--runs", default=str(RESULTS / "runs" / "own_data"))
    parser.add_argument("--force", action="store_true", help="rerun sets already in the JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    out_json = Path(args.out_json or RESULTS / ("own_data_val.json" if args.val else "own_data.json"))
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    for name in args.only:
        key = f"{name}:{args.tag}" if args.tag else name
        if key in results and not args.force:
            print(f"{key}: already in {out_json}, skipped (--force reruns it)")
            continue
        entry = run_set(name, cached_set(name, Path(args.cache)), args, overrides)
        results = json.loads(out_json.read_text()) if out_json.is_file() else {}  # merge with parallel runs
        results[key] = entry
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2) + "\n")
        train_acc = entry.get("acc_train_hungarian_seeds")
        print(
            (
                f"train part {100 * statistics.mean(train_acc):.1f} % "
                f"(k-means {100 * entry['kmeans_train_hungarian']:.1f}); "
                if train_acc
                else ""
            )
            + f"{key}: GMVAE {100 * entry['acc_hungarian']:.1f} +- {100 * entry['acc_hungarian_std']:.1f} %, "
            f"k-means {100 * entry['kmeans_hungarian']:.1f} % (N {entry['N']}, D {entry['D']}, K {entry['K']})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
