"""The reproduction benchmark: a tiny grid trains, summarises over seeds, and skips finished
cells when run again."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, load_script, requires_mnist


def _reproduce():
    return load_script("reproduce")


def test_summary_over_seeds():
    reproduce = _reproduce()
    rows = [{"acc_hungarian": a, "seconds": 1.0, "epochs": 2} for a in (0.5, 0.7, 0.6)]
    s = reproduce.summarise(rows)
    assert s["acc_hungarian"]["mean"] == pytest.approx(0.6)
    assert s["acc_hungarian"]["std"] == pytest.approx(0.1)
    assert (s["acc_hungarian"]["worst"], s["acc_hungarian"]["best"]) == (0.5, 0.7)
    assert s["num_seeds"] == 3
    assert "acc_hungarian_at_init" not in s


def test_summary_of_the_start_of_init_runs():
    reproduce = _reproduce()
    rows = [
        {"acc_hungarian": 0.7, "seconds": 1.0, "epochs": 2, "at_init": {"acc_paper": 0.5, "acc_hungarian": a}}
        for a in (0.6, 0.64)
    ]
    s = reproduce.summarise(rows)
    assert s["acc_hungarian_at_init"]["mean"] == pytest.approx(0.62)
    assert (s["acc_hungarian_at_init"]["worst"], s["acc_hungarian_at_init"]["best"]) == (0.6, 0.64)
    assert s["acc_paper_at_init"]["std"] == 0.0


@requires_mnist
def test_smoke_grid_is_resumable(tmp_path, capsys):
    reproduce = _reproduce()
    argv = [
        "--grid",
        "smoke",
        "--only",
        "0",
        "--seeds",
        "2",
        "--train-subset",
        "200",
        "--test-subset",
        "100",
        "--results",
        str(tmp_path),
    ]
    assert reproduce.main(argv) == 0
    results = json.loads((tmp_path / "mnist.json").read_text())
    ((name, entry),) = results["settings"].items()
    assert [r["seed"] for r in entry["per_seed"]] == [0, 1]
    assert entry["summary"]["num_seeds"] == 2 and entry["paper_key"] == "K=10, M=1"
    assert entry["machine"]["cpu_count"] >= 1
    table = (tmp_path / "mnist.md").read_text()
    assert name in table and "77.78 +- 5.75" in table
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert capsys.readouterr().out.count("done, read") == 2
    assert json.loads((tmp_path / "mnist.json").read_text())["settings"][name]["per_seed"] == entry["per_seed"]


@requires_mnist
def test_jobs_train_the_cells_in_processes_of_their_own(tmp_path, capsys):
    """--jobs 2: one child process per seed, both merged into one results file under its lock."""
    reproduce = _reproduce()
    base = ["--grid", "smoke", "--only", "0", "--train-subset", "200", "--test-subset", "100", "--epochs", "1"]
    assert reproduce.main([*base, "--seeds", "2", "--jobs", "2", "--results", str(tmp_path / "jobs")]) == 0
    assert capsys.readouterr().out.count("in a process of its own") == 2
    settings = json.loads((tmp_path / "jobs" / "mnist.json").read_text())["settings"]
    ((name, entry),) = settings.items()
    assert [r["seed"] for r in entry["per_seed"]] == [0, 1] and entry["summary"]["num_seeds"] == 2
    assert (tmp_path / "jobs" / "runs" / "smoke" / f"{name}-s1" / "metrics.json").is_file()


def test_readme_mnist_numbers_come_from_the_committed_results():
    """Every "mean +- std" of the README's MNIST headline and of results/mnist_notes.md (with or
    without [worst, best]) is a summary in experiments/results/mnist.json, formatted as
    reproduce.py formats it."""
    import re

    reproduce = _reproduce()
    results = json.loads((REPO / "experiments" / "results" / "mnist.json").read_text())
    summaries = [
        stats
        for entry in results["settings"].values()
        for key, stats in entry["summary"].items()
        if isinstance(stats, dict) and key not in ("seconds", "epochs", "elbo", "clusters_used")
    ]
    full = {reproduce._percent_cell(stats) for stats in summaries}
    short = {cell.split(" [")[0] for cell in full}
    readme = (REPO / "README.md").read_text()
    headline = readme[readme.index("## Results") : readme.index("## Your own data")]
    notes = (REPO / "experiments" / "results" / "mnist_notes.md").read_text()
    notes = notes[: notes.index("## Commands")]
    number = r"(?<![\d.])\d+\.\d \+- \d+\.\d(?![\d.])"
    cells = re.findall(number + r"(?: \[\d+\.\d, \d+\.\d\])?", headline)
    assert len(cells) >= 6
    cells += re.findall(number + r"(?: \[\d+\.\d, \d+\.\d\])?", notes)
    assert len(cells) >= 26
    missing = [c for c in cells if c not in (full if "[" in c else short)]
    assert not missing, f"README MNIST numbers not in mnist.json: {missing}"


def test_accuracy_figure_from_results(tmp_path):
    figure = load_script("mnist_figure")

    def seed(acc, start=None):
        row = {"acc_hungarian_per_epoch": acc, "acc_paper_per_epoch": acc}
        if start is not None:
            row["at_init"] = {"acc_hungarian": start, "acc_paper": start}
        return row

    def entry(K, per_seed, train_subset=None):
        return {"config": {"K": K}, "train_subset": train_subset, "summary": {"num_seeds": 2}, "per_seed": per_seed}

    results = {
        "settings": {
            "K10-a-e2": entry(10, [seed([0.5, 0.6]), seed([0.4, 0.5])]),
            "K10-a-e3": entry(10, [seed([0.5, 0.6, 0.7]), seed([0.4, 0.5, 0.6])]),  # longer: replaces e2
            "K10-init-e2": entry(10, [seed([0.6, 0.7], 0.65), seed([0.6, 0.6], 0.6)]),
            "K10-subset-e2": entry(10, [seed([0.1, 0.2]), seed([0.1, 0.2])], train_subset=1000),
            "K16-b-e2": entry(16, [seed([0.5, 0.6]), seed([0.5, 0.7])]),
            "K10-one-e2": entry(10, [seed([0.3, 0.4])]),  # one seed so far: a line without a band
        }
    }
    got = {name: (acc.shape, start) for name, acc, start in figure.curves(results, 10)}
    assert set(got) == {"K10-a-e3", "K10-init-e2", "K10-one-e2"} and got["K10-one-e2"][0] == (1, 2)
    assert got["K10-a-e3"][0] == (2, 3) and got["K10-a-e3"][1] is None
    assert list(got["K10-init-e2"][1]) == [0.65, 0.6]
    path = figure.plot(results, tmp_path / "acc.png")
    assert path.stat().st_size > 10_000


@requires_mnist
def test_continue_from_a_shorter_budget_equals_training_from_scratch(tmp_path, capsys):
    reproduce = _reproduce()
    base = ["--grid", "smoke", "--only", "0", "--seeds", "1", "--train-subset", "200", "--test-subset", "100"]
    continued, scratch = tmp_path / "continued", tmp_path / "scratch"
    assert reproduce.main([*base, "--epochs", "1", "--results", str(continued)]) == 0
    assert reproduce.main([*base, "--epochs", "2", "--continue-from", "1", "--results", str(continued)]) == 0
    assert "continuing" in capsys.readouterr().out
    assert reproduce.main([*base, "--epochs", "2", "--results", str(scratch)]) == 0

    def cell(folder):
        settings = json.loads((folder / "mnist.json").read_text())["settings"]
        (entry,) = [e for name, e in settings.items() if name.endswith("-e2")]
        (row,) = entry["per_seed"]
        return {k: row[k] for k in ("acc_hungarian_per_epoch", "acc_paper_per_epoch", "elbo", "nmi", "epochs")}

    assert cell(continued) == cell(scratch)
    assert len(json.loads((continued / "mnist.json").read_text())["settings"]) == 2  # e1 and e2 cells


def test_continue_from_needs_a_shorter_finished_cell(tmp_path, capsys):
    reproduce = _reproduce()
    base = ["--grid", "smoke", "--only", "0", "--seeds", "1", "--results", str(tmp_path)]
    with pytest.raises(SystemExit, match="between 1 and"):
        reproduce.main([*base, "--epochs", "2", "--continue-from", "2"])
    with pytest.raises(SystemExit, match="constant learning rate"):
        reproduce.main(["--grid", "k10long", "--results", str(tmp_path), "--continue-from", "10"])
    # No finished 1-epoch cell: the seed is recorded as an error, nothing is trained.
    assert reproduce.main([*base, "--epochs", "2", "--continue-from", "1"]) == 0
    assert "is not a finished cell" in capsys.readouterr().err
    (entry,) = json.loads((tmp_path / "mnist.json").read_text())["settings"].values()
    assert "is not a finished cell" in entry["per_seed"][0]["error"]


@requires_mnist
def test_restart_cells_record_every_start(tmp_path):
    reproduce = _reproduce()
    argv = ["--grid", "smoke", "--only", "2", "--seeds", "1", "--train-subset", "200", "--test-subset", "100"]
    assert reproduce.main([*argv, "--results", str(tmp_path)]) == 0
    ((name, entry),) = json.loads((tmp_path / "mnist.json").read_text())["settings"].items()
    assert "vae-kmeans1x2p1" in name
    (row,) = entry["per_seed"]
    assert len(row["starts"]) == 2
    assert all(set(s) == {"probe_loss", "acc_paper", "acc_hungarian"} for s in row["starts"])
    chosen = row["starts"][row["chosen_start"]]
    assert chosen["probe_loss"] == min(s["probe_loss"] for s in row["starts"])
    assert row["at_init"]["acc_hungarian"] == chosen["acc_hungarian"]


def test_grid_settings_fix_every_preset_option():
    """A grid cell must not change when DATA_PRESETS["mnist"] does (its epochs come from the grid)."""
    from pyro_gmvae.config import DATA_PRESETS

    reproduce = _reproduce()
    assert set(DATA_PRESETS["mnist"]) - {"epochs"} <= set(reproduce.BASE)


def test_confusions_script_reads_a_run_folder(tmp_path, capsys):
    from pyro_gmvae import Config, train

    script = load_script("mnist_confusions")
    folder = tmp_path / "grid" / "run"
    result = train(
        Config(data="spiral", train_subset=400, test_subset=200, epochs=1, progress=False, out=str(folder)),
        make_figures=False,
    )
    out = tmp_path / "confusions.json"
    assert script.main([str(folder), "--top", "3", "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["grid/run"]
    assert entry["epochs"] == 1 and entry["acc_hungarian"] == pytest.approx(result.final["acc_hungarian"])
    assert len(entry["confusions"]) <= 3
    counts = [c["count"] for c in entry["confusions"]]
    assert counts == sorted(counts, reverse=True) and all(c["digit"] != c["in_cluster_of"] for c in entry["confusions"])
    assert "grid/run" in capsys.readouterr().out
