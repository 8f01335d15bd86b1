"""Markdown tables and scaling notes for the README from ``experiments/results/speed.json``.

    python experiments/speed_table.py                      # print
    python experiments/speed_table.py --out /tmp/speed.md  # write

Every number comes from the JSON that ``experiments/bench_speed.py`` wrote.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("network", "hidden_dim", "K", "mc_samples", "batch_size")


def _ms(side: dict) -> str:
    return f"{side['median_step_s'] * 1e3:.1f}"


def _mem(row: dict, side: str) -> str:
    value = row[side].get("peak_memory_mib")
    return "-" if value is None else f"{value:.0f}"


def _factors(rows: list[dict], key: str, low, high, what) -> list[float]:
    """what(high) / what(low) over pairs of grid rows that differ only in ``key``."""
    index = {tuple(r["case"][k] for k in KEYS): r for r in rows}
    out = []
    for case, row in index.items():
        if dict(zip(KEYS, case, strict=True))[key] != low:
            continue
        other = tuple(high if k == key else v for k, v in zip(KEYS, case, strict=True))
        if other in index:
            out.append(what(index[other]) / what(row))
    return out


def _span(values: list[float]) -> str:
    if not values:
        return "not measured (cases skipped)"
    if len(values) == 1:
        return f"x{values[0]:.2f} (1 pair)"
    return f"x{min(values):.2f}-{max(values):.2f} (median x{statistics.median(values):.2f}, {len(values)} pairs)"


def scaling_notes(r: dict) -> list[str]:
    fc = [row for row in r["grid"] if row["case"]["network"] == "fc"]
    step = lambda row: row["project"]["median_step_s"]  # noqa: E731
    mem = lambda row: row["project"].get("peak_memory_mib") or float("nan")  # noqa: E731
    per_example = lambda row: row["project"]["median_step_s"] / row["case"]["batch_size"]  # noqa: E731
    small = [row["ratio"] for row in fc if row["case"]["batch_size"] == 50 and row["case"]["mc_samples"] == 1]
    rest = [row["ratio"] for row in fc if not (row["case"]["batch_size"] == 50 and row["case"]["mc_samples"] == 1)]
    lines = [
        "### Scaling notes (measured, project side)\n",
        "Factors are over the grid pairs that differ in one size only. The cases ran minutes apart under a load "
        "that varied, so the ranges are wide; the medians are the summary.\n",
        f"- **Batch B.** Step time changes by {_span(_factors(fc, 'batch_size', 50, 256, step))} from B=50 to 256 "
        f"(5.1x the examples) and by {_span(_factors(fc, 'batch_size', 256, 1024, step))} from 256 to 1024 (4x). "
        f"Time per example changes by {_span(_factors(fc, 'batch_size', 50, 1024, per_example))} from 50 to 1024: "
        f"the fixed per-step cost (Python, Pyro bookkeeping, kernel launches) is spread over more examples. "
        f"Step memory changes by {_span(_factors(fc, 'batch_size', 256, 1024, mem))} from 256 to 1024 (x4 would be "
        f"exactly linear; activations are B x H and M x B x K x Dx).",
        f"- **Particles M.** M=1 to 10 changes step time by {_span(_factors(fc, 'mc_samples', 1, 10, step))} and "
        f"step memory by {_span(_factors(fc, 'mc_samples', 1, 10, mem))}: the decoder, the prior network and the "
        f"(M, B, K, Dx) component table run per particle; the encoder runs once.",
        f"- **Clusters K.** K=10 to 30 changes step time by {_span(_factors(fc, 'K', 10, 30, step))} and step "
        f"memory by {_span(_factors(fc, 'K', 10, 30, mem))}: z is summed out exactly, so the prior network's output "
        f"layer (H x 2 K Dx) and the (M, B, K, Dx) density table grow linearly in K; the encoder and decoder do not.",
        f"- **Width H.** H=500 to 1000 changes step time by {_span(_factors(fc, 'hidden_dim', 500, 1000, step))} "
        f"and step memory by {_span(_factors(fc, 'hidden_dim', 500, 1000, mem))} (H x H layers grow 4x, the "
        f"input and output layers 2x).",
        f"- **Project / reference.** fc, B=50, M=1: {min(small):.3f}-{max(small):.3f}; every other fc case: "
        f"{min(rest):.3f}-{max(rest):.3f} (median {statistics.median(rest):.3f}, {len(rest)} cases).",
    ]
    epochs = [e for e in r.get("epochs") or [] if "error" not in e]
    if len(epochs) >= 2:
        full, part = epochs[0], epochs[1]
        n_full = full["steps"] * full["batch_size"]
        n_part = part["steps"] * part["batch_size"]
        tensor_mib = (n_full - n_part) * 784 * 4 / 2**20
        lines.append(
            f"- **Data size N.** An epoch is N / B steps whose work does not depend on N. {n_part} images took "
            f"{part['train_seconds']:.1f} s ({part['examples_per_s']:.0f} examples/s) and {n_full} took "
            f"{full['train_seconds']:.1f} s ({full['examples_per_s']:.0f} examples/s): "
            f"x{full['train_seconds'] / part['train_seconds']:.2f} for x{n_full / n_part:.1f} the data. The two "
            f"epochs ran at different moments on the shared cores, and their rates differ by "
            f"x{full['examples_per_s'] / part['examples_per_s']:.2f}. The training set is one float32 tensor on the "
            f"device. The whole run's peak RSS above its start (loading, training, evaluation, checkpoint) was "
            f"{part['peak_rss_delta_mib']:.0f} MiB with {n_part} images and {full['peak_rss_delta_mib']:.0f} MiB with "
            f"{n_full}, which is {full['peak_rss_delta_mib'] - part['peak_rss_delta_mib']:.0f} MiB more. The extra "
            f"images take {tensor_mib:.0f} MiB as float32 (784 pixels each)."
        )
    return lines


def render(r: dict) -> str:
    m = r["machine"]
    L: list[str] = []
    a = L.append
    a(
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, torch {r['torch']} with {m['torch_threads']} threads, "
        f"pyro {r['pyro']}; GPU: {r['gpu'] or r['gpu_note']}. Load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_start'])} at the start and "
        f"{', '.join(f'{x:.1f}' for x in m.get('load_average_end', m['load_average_now']))} at the end "
        f"(other jobs shared the 2 cores), so absolute times are noisy; the ratios come from interleaved steps. "
        f"The whole benchmark took {r['seconds'] / 60:.1f} min: `{r['command']}`.\n"
    )
    a("### Acceptance rows (mnist fc, H=500, K=10, M=1)\n")
    a("| batch | project ms/step | reference ms/step | project / reference | pairwise median | limit | steps per side "
      "| step peak memory MiB, project / reference | fresh-process peak MiB, project / reference |")  # fmt: skip
    a("|---|---|---|---|---|---|---|---|---|")
    rows = {row["name"]: row for row in r["grid"]}
    for acc in r["acceptance"]:
        row = rows[acc["name"]]
        fresh = row.get("fresh_process_peak_mib")
        fresh_s = f"{fresh['project']:.0f} / {fresh['reference']:.0f}" if fresh else "-"
        a(
            f"| {row['case']['batch_size']} | {_ms(row['project'])} | {_ms(row['reference'])} | **{acc['ratio']:.3f}** "
            f"| {acc['ratio_pairwise_median']:.3f} | {acc['limit']} | {acc['steps_per_side']} "
            f"| {_mem(row, 'project')} / {_mem(row, 'reference')} | {fresh_s} |"
        )
    a("")
    a("### Options (each against the default project step, interleaved)\n")
    a("| option | case | result |")
    a("|---|---|---|")
    for o in r["options"]:
        if "skipped" in o:
            a(f"| {o['option']} | - | skipped: {o['skipped']} |")
            continue
        if "error" in o:
            extra = f" after {o['wall_s']:.0f} s" if "wall_s" in o else ""
            a(f"| {o['option']} | {o['name']} | fails{extra}: `{o['error'][:160]}` |")
            continue
        text = (
            f"{_ms(o['with_option'])} ms vs {_ms(o['default'])} ms default: ratio **{o['ratio']:.3f}** "
            f"(pairwise {o['ratio_pairwise_median']:.3f}, n={o['steps_per_side']})"
        )
        if "first_step_s" in o:
            text += f"; first (compiling) step {o['first_step_s']:.1f} s, second {o['second_step_s']:.2f} s"
        a(f"| {o['option']} | {o['name']} | {text} |")
    a("")
    if r.get("epochs"):
        a(
            "### MNIST fc epochs through `training.train`\n\n"
            "One epoch each; train seconds exclude loading and evaluation.\n"
        )
        a(
            "| device | H | K | M | batch | examples trained | steps | train seconds | examples/s "
            "| peak RSS above start, MiB |"
        )
        a("|---|---|---|---|---|---|---|---|---|---|")
        for e in r["epochs"]:
            if "error" in e:
                a(
                    f"| {r['device_name']} | - | - | - | - | {e['train_subset'] or 60000} | - | - "
                    f"| fails: `{e['error'][:120]}` | - |"
                )
                continue
            n = e["steps"] * e["batch_size"]
            a(
                f"| {r['device_name']} | {e['hidden_dim']} | {e['K']} | {e['mc_samples']} | {e['batch_size']} | {n} "
                f"| {e['steps']} | {e['train_seconds']:.1f} | **{e['examples_per_s']:.0f}** "
                f"| {e['peak_rss_delta_mib']:.0f} |"
            )
        a("")
    a("### Grid (median step times, interleaved; memory = peak above resident over 2 steps)\n")
    a("| network | H | K | M | batch | project ms | reference ms | ratio | steps per side | examples/s (project) "
      "| step memory MiB project / reference | parameters MiB |")  # fmt: skip
    a("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = sorted(r["grid"], key=lambda row: tuple(row["case"][k] for k in KEYS))
    for row in order:
        c = row["case"]
        a(
            f"| {c['network']} | {c['hidden_dim']} | {c['K']} | {c['mc_samples']} | {c['batch_size']} "
            f"| {_ms(row['project'])} | {_ms(row['reference'])} | {row['ratio']:.3f} | {row['steps_per_side']} "
            f"| {row['project']['examples_per_s']:.0f} | {_mem(row, 'project')} / {_mem(row, 'reference')} "
            f"| {row['parameters_mib']:.1f} |"
        )
    if r.get("grid_skipped"):
        a("")
        a("Not run (the benchmark's `--deadline` would have been exceeded; the predicted step time scales the "
          "slowest of the last three fc cases by a flop count):\n")  # fmt: skip
        for s in r["grid_skipped"]:
            a(f"- {s['name']}: {s['reason']}")
    a("")
    L.extend(scaling_notes(r))
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
