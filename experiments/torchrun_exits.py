"""Count how two-process torchrun jobs exit: the check that every rank ends cleanly.

    python experiments/torchrun_exits.py            # 30 runs of the command below
    python experiments/torchrun_exits.py --runs 5 --json exits.json

Each run is ``torchrun --standalone --nproc_per_node=2 experiments/run.py --epochs 2
--device cpu`` with progress bars on, in one scratch folder (so the runs go to the
fresh default folders runs/spiral-v2-K8-seed0-1, -2, ...).  A run is clean when torchrun
exits 0 and no rank printed ``terminate called`` (the SIGABRT of a process that left
gloo's threads holding work objects, see pyro_gmvae.distributed.shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["--standalone", "--nproc_per_node=2", str(REPO / "experiments" / "run.py"), "--epochs", "2"]


def run_once(cwd: Path, timeout: float = 300) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *COMMAND, "--device", "cpu"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    return {
        "returncode": proc.returncode,
        "aborted": "terminate called" in output or "SIGABRT" in output,
        "seconds": round(time.perf_counter() - t0, 1),
        "tail": output[-1500:] if proc.returncode else "",
    }


def measure(runs: int, cwd: Path, log=print) -> dict:
    results = []
    for i in range(runs):
        result = run_once(cwd)
        results.append(result)
        log(f"run {i + 1}/{runs}: exit {result['returncode']}{' (abort)' if result['aborted'] else ''}")
    codes = Counter(r["returncode"] for r in results)
    clean = sum(r["returncode"] == 0 and not r["aborted"] for r in results)
    return {
        "runs": runs,
        "clean": clean,
        "exit_codes": dict(codes),
        "aborts": sum(r["aborted"] for r in results),
        "failures": [r for r in results if r["returncode"] or r["aborted"]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json", help="write the counts here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="torchrun-exits-") as scratch:
        summary = measure(args.runs, Path(scratch), log=lambda line: print(line, flush=True))
    print(f"{summary['clean']}/{summary['runs']} torchrun runs exit 0; exit codes {summary['exit_codes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["clean"] == summary["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
