"""Every bad input to ``experiments/run.py`` gives one clear line on stderr and writes nothing.

Each case runs the real CLI in a subprocess inside its own folder (the working directory,
the data root and ``--out`` all live there) and checks: a non-zero exit, exactly one
``error: ...`` line on stderr naming the problem, no traceback, and that no file under the
folder was created, changed or removed (for a new run the ``--out`` folder must not
appear).  The subprocesses run a few at a time because each one pays the torch import.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "experiments" / "run.py"
TINY = ["--epochs", "1", "--no-progress", "--train-subset", "400", "--test-subset", "100"]


def _npz(name, **arrays):
    def setup(folder: Path) -> list[str]:
        np.savez(folder / name, **arrays)
        return ["--data", str(folder / name)]

    return setup


def _raw_bytes(name, payload):
    def setup(folder: Path) -> list[str]:
        (folder / name).write_bytes(payload)
        return ["--data", str(folder / name)]

    return setup


def _write(path: Path, text: str) -> list[str]:
    path.write_text(text)
    return []


def _existing_run(folder: Path) -> list[str]:
    out = folder / "out"
    out.mkdir()
    (out / "config.json").write_text('{"data": "other"}\n')
    (out / "notes.txt").write_text("someone else's run\n")
    return []


def _empty_root(folder: Path) -> list[str]:
    (folder / "empty-root").mkdir()
    return ["--data-root", str(folder / "empty-root")]


_rng = np.random.default_rng(0)
_good = _rng.random((120, 4)).astype(np.float32)
_with_nan = _good.copy()
_with_nan[7, 2] = np.nan
_with_inf = _good.copy()
_with_inf[3, 0] = np.inf


def SLOW(*case):
    """A variant of a case above: run with ``-m slow`` to keep the default suite quick."""
    return pytest.param(case, marks=pytest.mark.slow, id=case[0])


# id, extra CLI flags, set-up (returns more flags), words the one-line message must contain
CASES = [
    ("mnist-missing", ["--data", "mnist"], _empty_root, ["MNIST", "not found", "--data-root", "--download"]),
    ("npz-missing", [], lambda f: ["--data", str(f / "absent.npz")], ["absent.npz", "not found"]),
    ("npz-corrupt", [], _raw_bytes("corrupt.npz", os.urandom(300)), ["corrupt.npz", "cannot read"]),
    ("npz-truncated", [], lambda f: _truncated_npz(f), ["half.npz", "cannot read"]),
    ("npz-no-x", [], _npz("nox.npz", y=_good), ["nox.npz", "no array 'x'"]),
    ("npz-wrong-shape", [], _npz("flat.npz", x=_good[:, 0]), ["flat.npz:x", "shape"]),
    SLOW("npz-text-dtype", [], _npz("text.npz", x=np.array([["a", "b"]] * 120)), ["text.npz:x", "numeric"]),
    ("conv-on-vectors", ["--network", "conv"], _npz("vec.npz", x=_good), ["--network conv", "--network fc"]),
    ("bernoulli-range", ["--likelihood", "bernoulli"], _npz("wide.npz", x=2 * _good), ["[0, 1]", "--likelihood"]),
    ("npz-nan", [], _npz("nan.npz", x=_with_nan), ["NaN or infinite", "clean the data"]),
    ("npz-inf", [], _npz("inf.npz", x=_with_inf), ["NaN or infinite"]),
    (
        "fewer-than-batch",
        ["--train-subset", "30", "--batch-size", "50"],
        None,
        ["30 training", "--batch-size"],
    ),
    ("K-zero", ["--K", "0"], None, ["--K", "positive"]),
    ("K-negative", ["--K", "-3"], None, ["--K", "positive"]),
    ("x-dim-zero", ["--x-dim", "0"], None, ["--x-dim", "positive"]),
    SLOW("w-dim-negative", ["--w-dim", "-2"], None, ["--w-dim", "positive"]),
    ("hidden-dim-zero", ["--hidden-dim", "0"], None, ["--hidden-dim", "positive"]),
    ("cv-weight-negative", ["--cv-weight", "-1"], None, ["--cv-weight", ">= 0"]),
    ("z-prior-weight-negative", ["--z-prior-weight", "-1"], None, ["--z-prior-weight", ">= 0"]),
    ("mc-samples-zero", ["--mc-samples", "0"], None, ["--mc-samples", "positive"]),
    ("free-bits-negative", ["--free-bits", "-0.5"], None, ["--free-bits", ">= 0"]),
    ("balance-tolerance-negative", ["--balance-tolerance", "-0.1"], None, ["--balance-tolerance", ">= 0"]),
    ("augment-weight-negative", ["--augment-weight", "-1"], None, ["--augment-weight", ">= 0"]),
    (
        "augment-on-tiny-images",
        ["--augment-weight", "1"],
        _npz("tiny.npz", x=_good.reshape(120, 2, 2)),
        ["--augment-weight", "(2, 2)", "feature vectors"],
    ),
    ("anchor-without-start", ["--init-anchor-epochs", "2"], None, ["--init-anchor-epochs", "vae-kmeans"]),
    (
        "anchor-with-labels",
        ["--init-anchor-epochs", "2", "--init", "vae-kmeans", "--labels", "10"],
        None,
        ["--init-anchor-epochs", "--labels"],
    ),
    SLOW("lr-zero", ["--lr", "0"], None, ["--lr", "positive"]),
    ("unknown-data", ["--data", "cifar"], None, ["cifar", "spiral", "mnist", "svhn", ".npz"]),
    ("unknown-network", ["--network", "resnet"], None, ["--network", "resnet", "conv", "fc"]),
    ("unknown-likelihood", ["--likelihood", "poisson"], None, ["--likelihood", "poisson", "bernoulli", "gaussian"]),
    ("unknown-guide", ["--guide", "v3"], None, ["--guide", "v3", "v1", "v2"]),
    ("unknown-init", ["--init", "pca"], None, ["--init", "pca", "random", "vae-kmeans"]),
    SLOW("pretrain-epochs-zero", ["--init", "vae-kmeans", "--pretrain-epochs", "0"], None, ["--pretrain-epochs"]),
    SLOW("pretrain-lr-negative", ["--init", "vae-kmeans", "--pretrain-lr", "-1"], None, ["--pretrain-lr", "positive"]),
    ("restarts-without-init", ["--init", "random", "--init-restarts", "3"], None, ["--init-restarts", "vae-kmeans"]),
    ("init-restarts-zero", ["--init", "vae-kmeans", "--init-restarts", "0"], None, ["--init-restarts", "positive"]),
    ("fit-without-init", ["--init", "random", "--init-fit-epochs", "2"], None, ["--init-fit-epochs", "vae-umap"]),
    ("weights-without-init", ["--init-weights", "partition"], None, ["--init-weights", "vae-kmeans"]),
    ("unknown-init-weights", ["--init-weights", "kmeans"], None, ["--init-weights", "uniform", "partition"]),
    ("fit-epochs-negative", ["--init", "vae-umap", "--init-fit-epochs", "-1"], None, ["--init-fit-epochs", ">= 0"]),
    ("fit-weight-negative", ["--init", "vae-umap", "--init-fit-weight", "-2"], None, ["--init-fit-weight", ">= 0"]),
    ("K-not-int", ["--K", "abc"], None, ["--K", "abc", "--help"]),
    ("unknown-flag", ["--clusters", "5"], None, ["--clusters", "--help"]),
    ("device-tpu", ["--device", "tpu"], None, ["tpu", "cpu, cuda or cuda:N"]),
    ("device-cuda", ["--device", "cuda"], None, ["cuda", "--device cpu"]),
    ("device-cuda-3", ["--device", "cuda:3"], None, ["cuda:3"]),
    ("out-holds-other-run", [], _existing_run, ["already holds", "--resume", "--overwrite"]),
    SLOW("out-is-a-file", [], lambda f: _write(f / "out", "not a folder"), ["is a file"]),
    SLOW("resume-and-overwrite", ["--resume", "--overwrite"], None, ["--resume", "--overwrite"]),
    ("resume-without-run", ["--resume"], None, ["--resume", "does not exist"]),
]


def _truncated_npz(folder: Path) -> list[str]:
    np.savez(folder / "full.npz", x=_good)
    payload = (folder / "full.npz").read_bytes()
    (folder / "half.npz").write_bytes(payload[: len(payload) // 2])
    (folder / "full.npz").unlink()
    return ["--data", str(folder / "half.npz")]


def _skip_reason(case_id: str) -> str | None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if case_id == "device-cuda" and count > 0:
        return "a CUDA GPU is present"
    if case_id == "device-cuda-3" and count > 3:
        return "this machine has a cuda:3"
    return None


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its kind, size, mtime and content hash."""
    state = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(folder))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return state


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: float = 180):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(RUN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _run_case(case, base: Path) -> dict:
    case_id, flags, setup, _ = case
    folder = base / case_id
    folder.mkdir()
    (folder / "data-root").mkdir()  # $PYRO_GMVAE_DATA: must stay untouched too
    out_existed = False
    extra = setup(folder) if setup else []
    out_existed = (folder / "out").exists()
    before = snapshot(folder)
    args = [*TINY, "--out", str(folder / "out"), *flags, *extra]
    proc = run_cli(args, cwd=folder, env_extra={"PYRO_GMVAE_DATA": str(folder / "data-root")})
    return dict(proc=proc, before=before, after=snapshot(folder), out_existed=out_existed, folder=folder)


def _case(entry) -> tuple:
    return entry.values[0] if hasattr(entry, "values") else entry


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """Run the selected cases (after -k / -m deselection) a few at a time."""
    base = tmp_path_factory.mktemp("cli_errors")
    selected = {
        item.callspec.params["case"][0]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input_gives_one_line_and_writes_nothing"
    }
    cases = [c for c in map(_case, CASES) if c[0] in selected and _skip_reason(c[0]) is None]
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda c: _run_case(c, base), cases))
    return {c[0]: r for c, r in zip(cases, done, strict=True)}


@pytest.mark.parametrize("case", [c if hasattr(c, "values") else pytest.param(c, id=c[0]) for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(case, results):
    case_id, _, _, words = case
    reason = _skip_reason(case_id)
    if reason:
        pytest.skip(reason)
    r = results[case_id]
    proc = r["proc"]
    assert proc.returncode != 0, proc.stdout
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: ") + 10, line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert proc.stdout == ""
    assert r["after"] == r["before"], "files were written or changed"
    if not r["out_existed"]:
        assert not (r["folder"] / "out").exists()


def test_valid_names_stay_in_help():
    """Dropping argparse ``choices`` must not hide the valid names from --help."""
    proc = run_cli(["--help"], cwd=REPO)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for name in ("conv | fc", "bernoulli | gaussian", "v1 | v2", "learned | tied | uniform"):
        assert name in text
