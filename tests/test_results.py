"""Committed results match the code: each records its commit and resolved config, and the
cells the README quotes were made at a config equal to today's defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from common import trained_config
from conftest import load_script

from pyro_gmvae.config import ADDED_KEYS, Config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
README = (REPO / "README.md").read_text()

# The MNIST cells of the README's headline table and the defaults they stand for.
MNIST_QUOTED = {
    "K10-M1-v2-fcH500-lr0.0001-b256-cv2-eta1-fb0-vae-umap10f3w10a3-aug100-e10": {},
    # the previous defaults (the README says so): today's less the anchor; less the term too, 20 epochs
    "K10-M1-v2-fcH500-lr0.0001-b256-cv2-eta1-fb0-vae-umap10f3w10-aug100-e10": {"init_anchor_epochs": 0},
    "K10-M1-v2-fcH500-lr0.0001-b256-cv2-eta1-fb0-vae-umap10f3w10-e20": {
        "augment_weight": 0.0,
        "epochs": 20,
        "init_anchor_epochs": 0,
    },
    "K16-M1-v2-fcH500-lr0.0001-b256-cv2-eta1-fb0-vae-umap10f3w10a3-aug100-e10": {"K": 16},
    "K16-M1-v2-fcH500-lr0.0001-b256-cv2-eta1-fb0-vae-umap10f3w10-e20": {
        "K": 16,
        "augment_weight": 0.0,
        "epochs": 20,
        "init_anchor_epochs": 0,
    },
}


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _same_training(recorded: dict, today: dict) -> None:
    """``recorded`` equals ``today``, except for options added since that sit at their
    default (an option is only added with a default that leaves earlier runs unchanged)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    defaults.update(ADDED_KEYS)  # options filled per data set: the value earlier runs had in effect
    added = {k for k in today if k not in recorded}
    assert not set(recorded) - set(today), f"options no longer known: {set(recorded) - set(today)}"
    assert {k: today[k] for k in added} == {k: defaults[k] for k in added}
    assert {k: today[k] for k in recorded} == recorded


@pytest.mark.parametrize("name", sorted(MNIST_QUOTED))
def test_readme_mnist_cells_were_made_at_todays_defaults(name):
    entry = _json("mnist.json")["settings"][name]
    today = trained_config(Config(data="mnist", **MNIST_QUOTED[name]).resolved().to_dict())
    _same_training(entry["resolved_config"], today)
    assert (entry["provenance"] or {}).get("first_committed_in") or all(r["commit"] for r in entry["per_seed"])


def _pm(summary: dict, key: str) -> str:
    """A cell of the README's MNIST table: mean +- std in %, the mean alone for one seed."""
    mean, std = 100 * summary[key]["mean"], 100 * summary[key]["std"]
    return f"{mean:.1f}" if summary["num_seeds"] == 1 else f"{mean:.1f} +- {std:.1f}"


def test_readme_scratch_rows_come_from_mnist_json():
    """Each README row made by ``reproduce.py --grid scratch --only N`` quotes that cell's summary."""
    reproduce = load_script("reproduce")
    settings = reproduce.grid_settings("scratch")
    epochs = reproduce.GRIDS["scratch"]["epochs"]
    rows = [
        line for line in README.splitlines() if line.startswith("|") and "`reproduce.py --grid scratch --only" in line
    ]
    assert rows
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        index = int(cells[-1].split("--only ")[1].split()[0].rstrip("`"))
        name = f"{reproduce.setting_name(settings[index], None)}-e{epochs}"
        summary = _json("mnist.json")["settings"][name]["summary"]
        assert cells[1:5] == [
            str(settings[index]["K"]),
            str(summary["num_seeds"]),
            _pm(summary, "acc_paper"),
            _pm(summary, "acc_hungarian"),
        ], row


def test_readme_spiral_numbers_were_made_at_todays_defaults():
    spiral = _json("spiral.json")
    _same_training(spiral["config"], trained_config(Config().resolved().to_dict()))
    assert spiral["commit"]["sha"]


def test_every_result_file_records_its_commit_and_config():
    for file in sorted(RESULTS.glob("*.json")):
        result = json.loads(file.read_text())
        if file.name == "mnist.json":
            for entry in result["settings"].values():
                assert entry["resolved_config"] and entry.get("provenance") or entry["per_seed"][0].get("commit")
            continue
        text = json.dumps(result)
        assert '"commit' in text or '"git_commit' in text, f"{file.name} records no commit"
        assert '"config' in text, f"{file.name} records no config"


def test_readme_own_data_table_comes_from_own_data_json():
    results = _json("own_data.json")
    table = README[README.index("| data | N | D | K | GMVAE | k-means |") :].split("\n\n")[0].splitlines()[2:]
    quoted = []
    for row in table:
        gmvae, kmeans = (cell.replace("**", "").strip() for cell in row.strip("|").split("|")[4:6])
        quoted += [("acc_hungarian", v.split(" +- ")[0]) for v in gmvae.split(" / ")]
        quoted += [("kmeans_hungarian", v) for v in kmeans.split(" / ")]
    assert len(quoted) == 14
    committed = {(key, f"{100 * entry[key]:.1f}") for entry in results.values() for key in dict(quoted)}
    assert set(quoted) <= committed, set(quoted) - committed


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "moons", "blobs", "aniso"])
def test_own_data_results_were_made_with_todays_npz_defaults(name):

    from pyro_gmvae.autoconfig import npz_defaults

    own_data = load_script("own_data")
    entry = _json("own_data.json")[name]
    x = own_data.make_set(name)["x"]
    used = {k: entry["config_seed0"][k] for k in npz_defaults(x, entry["K"])}
    assert used == npz_defaults(x, entry["K"])
    assert entry["git_commit"]


def test_readme_spiral_table_comes_from_spiral_json():
    seeds = _json("spiral.json")["seeds"]
    row = README[README.index("| seed | purity | NMI |") :].splitlines()[2]
    cells = [cell.strip().split(" / ") for cell in row.strip("|").split("|")]
    columns = {"purity": "{:.3f}", "nmi": "{:.3f}", "acc_hungarian": "{:.3f}"}
    columns.update(clusters_used="{}", seconds="{:.1f}")
    for values, (key, fmt) in zip(cells[1:], columns.items(), strict=True):
        assert values == [fmt.format(seed[key]) for seed in seeds], key


def test_readme_loglik_numbers_come_from_loglik_json():
    result = _json("loglik.json")
    assert result["num_samples"] == 5000 and result["config"]["binarize"] == "dynamic" and result["git_commit"]
    quoted = f"**{result['loglik_mean']:.2f} +- {result['loglik_stderr']:.2f} nats**"
    assert quoted in README and f"ELBO of {result['elbo_mean']:.2f} +- {result['elbo_stderr']:.2f}" in README
    assert f"first {result['num_examples']:,} test images" in README
    assert result["loglik_mean"] > result["elbo_mean"]  # tighter than the bound


def test_readme_semisupervised_row_comes_from_semisupervised_json():
    result = _json("semisupervised.json")
    by_labels = result["by_labels"]
    assert list(by_labels) == ["100", "600", "1000", "3000"] and result["chosen_on"]
    row = README[README.index("| labels | 100 | 600 | 1000 | 3000 |") :].splitlines()[2]
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    expected = [f"{100 * e['accuracy']['mean']:.2f} +- {100 * e['accuracy']['std']:.2f}" for e in by_labels.values()]
    assert [cell.replace("**", "") for cell in cells] == expected
    for entry in by_labels.values():
        assert len(entry["accuracy"]["per_draw"]) == 3 and entry["resolved_config"] and entry["commits"]


def test_readme_speed_rows_come_from_speed_json():
    result = _json("speed.json")
    rows = {row["case"]["batch_size"]: row for row in result["rows"] if row["autocast"] is None}
    table = README[README.index("| batch | 8 | 64 | 256 | 1024 |") :].split("\n\n")[0].splitlines()[2:]
    assert len(table) == 3
    for line, side in zip(table, ("compiled", "eager", "reference_loop"), strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")][1:]
        expected = [f"{rows[b][side]['ratio']:.3f}" for b in (8, 64, 256, 1024)]
        expected[0] += f" ({rows[8][side]['added_ms']:+.2f} ms)"
        assert cells == expected, side
    kinds = [(e["elbo"], e["init"], e.get("adam_kernel", "auto")) for e in result["epochs"]]
    epoch = result["epochs"][kinds.index(("compiled", "random", "auto"))]
    assert f"took {epoch['train_seconds']:.1f} s on 2 CPU threads" in README
    fused = result["epochs"][kinds.index(("compiled", "random", "fused"))]
    assert f"{fused['train_seconds']:.1f} s with `--adam-kernel fused`" in README


def test_a_results_file_written_by_an_earlier_cell_does_not_make_the_tree_dirty(tmp_path):
    """git_commit's ``dirty``: uncommitted changes to tracked files, except the committed results."""
    import subprocess

    common = load_script("common")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "lib.py").write_text("a = 1\n")
    (tmp_path / "experiments" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "start")
    assert common.git_commit(tmp_path)["dirty"] is False
    (tmp_path / "experiments" / "results" / "r.json").write_text('{"seed 0": 1}\n')
    assert common.git_commit(tmp_path)["dirty"] is False
    (tmp_path / "lib.py").write_text("a = 2\n")
    assert common.git_commit(tmp_path)["dirty"] is True


def test_denormal_comparison_is_the_mean_of_the_last_epochs():
    compare = load_script("bench_denormal").compare
    runs = [
        {"flush_denormal": False, "per_epoch": [{"seconds": s} for s in (40.0, 80.0, 120.0, 160.0)]},
        {"flush_denormal": True, "per_epoch": [{"seconds": s} for s in (40.0, 40.0, 40.0, 40.0)]},
    ]
    result = compare(runs)
    assert result["last_3_epochs_seconds_without"] == 120.0 and result["last_3_epochs_seconds_with"] == 40.0
    assert result["ratio_without_over_with"] == 3.0
    assert result["first_epoch_seconds"] == {"false": 40.0, "true": 40.0}


def test_readme_denormal_table_comes_from_denormal_json():
    result = _json("denormal.json")
    table = README[README.index("| run | epoch 1 | epoch 8 |") :].split("\n\n")[0].splitlines()[2:]
    expected = []
    for setting in result["settings"]:
        metric = "acc_hungarian" if setting["K"] == 10 else "acc_paper"
        for run in setting["runs"]:
            seconds = [row["seconds"] for row in run["per_epoch"]]
            label = f"K = {setting['K']}" + (", `--flush-denormal`" if run["flush_denormal"] else "")
            accuracy = 100 * run["per_epoch"][-1][metric]
            expected.append(
                f"| {label} | {seconds[0]:.1f} | {seconds[-1]:.1f} | {sum(seconds[-3:]) / 3:.1f} | {accuracy:.1f} |"
            )
    assert table == expected
    assert result["git_commit"]["sha"] and not result["git_commit"]["dirty"]
    assert {run["resolved_config"]["flush_denormal"] for s in result["settings"] for run in s["runs"]} == {False, True}


def test_readme_allocator_rows_come_from_allocator_json():
    result = _json("allocator.json")
    assert result["git_commit"]["sha"] and result["git_commit"]["dirty"] is False
    table = README[README.index("| batch | allocator | compiled step |") :].split("\n\n")[0].splitlines()[2:]
    expected = []
    for row in result["rows"]:
        for setting, label in (("glibc", "glibc's own"), ("kept", "kept")):
            c, r = row[setting]["compiled"], row[setting]["reference"]
            expected.append(
                f"| {row['batch_size']} | {label} | {c['median_step_ms']:.1f} ms | {c['minor_faults_per_step']:,.0f} "
                f"| {r['median_step_ms']:.1f} ms |"
            )
        assert f"batch {row['batch_size']}: x{row['compiled_kept_over_glibc']:.2f}" in README
    assert table == expected
