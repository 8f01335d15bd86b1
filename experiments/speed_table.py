"""Markdown tables for the README from ``experiments/results/speed.json``.

    python experiments/speed_table.py                      # print
    python experiments/speed_table.py --out /tmp/speed.md  # write

Every number comes from the JSON that ``experiments/bench_speed.py`` wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ms(side: dict) -> str:
    return f"{side['median_step_s'] * 1e3:.1f}"


def _load(m: dict, key: str) -> str:
    return ", ".join(f"{x:.1f}" for x in m[key])


def header(r: dict) -> str:
    m = r["machine"]
    git = r.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10]
    dirty = " (with uncommitted library changes)" if git.get("library_files_changed_since_commit") else ""
    end = "load_average_end" if "load_average_end" in m else "load_average_now"
    cpu = m["cpu_model"]
    if m.get("cpu_family") is not None:  # recorded since the behaviour pins told two AMD EPYC machines apart
        kernels = m["torch_cpu_capability"]
        cpu += f" (family {m['cpu_family']}, model {m['cpu_model_number']}, torch's {kernels} kernels)"
    return (
        f"Machine: {cpu}, {m['cpu_count']} cores, torch {r['torch']} with {m['torch_threads']} threads, "
        f"pyro {r['pyro']}; GPU: {r['gpu'] or r['gpu_note']}. Commit {commit}{dirty}. Load average (1, 5, 15 min) "
        f"{_load(m, 'load_average_start')} at the start and {_load(m, end)} "
        f"at the end (other jobs shared the cores), so absolute times are noisy; the ratios come from interleaved "
        f"steps. The benchmark took {r['seconds'] / 60:.1f} min: `{r['command']}`.\n"
    )


def acceptance_table(r: dict) -> list[str]:
    lines = [
        "| target | batch | compiled (default) | eager | limit | met | compiled against reference_loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in r["acceptance"]:
        fmt = (lambda v: f"{v:+.2f} ms") if a["unit"] == "ms" else (lambda v: f"x{v:.3f}")
        lines.append(
            f"| {a['what']} | {a['batch']} | **{fmt(a['compiled'])}** | {fmt(a['eager'])} | {fmt(a['limit'])} "
            f"| {'yes' if a['pass'] else 'no'} | {fmt(a['compiled_against_reference_loop'])} |"
        )
    return lines


def step_table(rows: list[dict]) -> list[str]:
    lines = [
        "| batch | autocast | reference ms/step | compiled / reference | eager / reference "
        "| reference_loop / reference | compiled added ms | eager added ms | CPU-time ratio compiled / eager "
        "| examples/s compiled | steps per side "
        "| step memory MiB compiled / eager / reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c, e, loop, ref = row["compiled"], row["eager"], row["reference_loop"], row["reference"]
        mem = "-"
        if "peak_memory_mib" in c:
            mem = " / ".join(f"{row[s]['peak_memory_mib']:.0f}" for s in ("compiled", "eager", "reference"))
        lines.append(
            f"| {row['case']['batch_size']} | {row.get('autocast') or '-'} | {_ms(ref)} | **{c['ratio']:.3f}** "
            f"| {e['ratio']:.3f} | {loop['ratio']:.3f} | {c['added_ms']:+.2f} | {e['added_ms']:+.2f} "
            f"| {c['cpu_ratio']:.3f} / {e['cpu_ratio']:.3f} | {c['examples_per_s']:.0f} | {row['steps_per_side']} "
            f"| {mem} |"
        )
    return lines


def epoch_table(r: dict) -> list[str]:
    lines = [
        "| --elbo | --init | training images | steps | epoch seconds | examples/s | wall seconds (with init, load, "
        "evaluation, checkpoint) | peak memory MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in r["epochs"]:
        if "error" in e:
            lines.append(f"| {e['elbo']} | {e['init']} | - | - | fails: `{e['error'][:120]}` | - | - | - |")
            continue
        n = e["steps"] * e["batch_size"]
        lines.append(
            f"| {e['elbo']} | {e['init']} | {n} | {e['steps']} | **{e['train_seconds']:.1f}** "
            f"| {e['examples_per_s']:.0f} | {e['wall_seconds_with_init_load_eval_checkpoint']:.1f} "
            f"| {e['peak_memory_mib']:.0f} ({e['peak_memory_method']}) |"
        )
    return lines


def render(r: dict) -> str:
    cfg = r["config"]
    L = [header(r)]
    L.append(
        f"### The training step against plain PyTorch (mnist fc, H={cfg['hidden_dim']}, K={cfg['K']}, "
        f"M={cfg['mc_samples']}, {cfg['optimizer']})\n"
    )
    L += acceptance_table(r)
    L.append("")
    L.append(
        "compiled: the default step (`--elbo compiled`, a replayed trace of TraceEnum_ELBO's loss); eager: "
        "`--elbo eager`, Pyro's own step; reference: the same objective by hand in PyTorch, bare; reference_loop: "
        "that objective through the project's loop with its non-finite guard. Added ms = median step minus the "
        "reference's median step.\n"
    )
    plain = [row for row in r["rows"] if not row.get("autocast")]
    L += step_table(plain)
    autocast = [row for row in r["rows"] if row.get("autocast")]
    if autocast:
        L.append("")
        L.append("Under bf16 autocast (all sides):\n")
        L += step_table(autocast)
    if r.get("epochs"):
        L.append("")
        L.append(f"### MNIST fc epochs through `pyro_gmvae.train` on {r['device_name']}\n")
        L += epoch_table(r)
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="?", default=str(HERE / "results" / "speed.json"))
    p.add_argument("--out", help="write the Markdown here instead of printing it")
    args = p.parse_args(argv)
    text = render(json.loads(Path(args.json).read_text()))
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
