"""pyro_gmvae.runfolder: folder policy, the saved-config merge of --resume, the files a run writes."""

from __future__ import annotations

import json

import pytest
import torch

from pyro_gmvae.config import Config
from pyro_gmvae.errors import UserInputError
from pyro_gmvae.runfolder import RunFolder, check_compatible, rng_state, set_rng_state


def test_default_name_names_data_guide_clusters_and_seed():
    assert RunFolder.default_name(Config(seed=3).resolved()) == "spiral-v2-K8-seed3"
    assert RunFolder.default_name(Config(data="x/mine.npz").resolved()) == "mine-v2-K10-seed0"


def test_default_folders_are_numbered_and_never_collide(tmp_path):
    config = Config(seed=3).resolved()
    with pytest.raises(UserInputError, match="holds no spiral-v2-K8-seed3-N run"):
        RunFolder.latest_default(config, tmp_path)
    first = RunFolder.create_default(config, tmp_path)
    (tmp_path / "spiral-v2-K8-seed3-7").mkdir()  # a gap: the next is above the highest
    (tmp_path / "spiral-v2-K8-seed3-x").mkdir()  # not a number: ignored
    second = RunFolder.create_default(config, tmp_path)
    assert first.path.name == "spiral-v2-K8-seed3-1" and second.path.name == "spiral-v2-K8-seed3-8"
    assert RunFolder.latest_default(config, tmp_path).path == second.path
    # A fresh folder that the run never wrote to is removed when it is refused and closed.
    second.check(resume=False, overwrite=False)
    second.close()
    assert not second.path.exists() and first.path.is_dir()


def test_a_new_run_never_replaces_another_unless_told(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.check(resume=False, overwrite=False)  # absent: fine, and locked
    assert (tmp_path / "run" / ".lock").is_file()
    folder.close()
    assert not (tmp_path / "run").exists()  # made by the check, never written: removed
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="already holds files"):
        folder.check(resume=False, overwrite=False)
    with pytest.raises(UserInputError, match="no config.json"):
        folder.check(resume=False, overwrite=True)
    with pytest.raises(UserInputError, match="holds no checkpoint"):
        folder.check(resume=True, overwrite=False)


def test_open_writes_config_and_metrics_and_resume_config_merges_flags(tmp_path):
    folder = RunFolder(tmp_path / "run")
    config = Config(K=5, out=str(folder.path)).resolved()
    folder.open(config, history=[{"epoch": 1}])
    saved = json.loads((folder.path / "config.json").read_text())
    assert saved["K"] == 5 and "versions" in saved
    assert (folder.path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    folder.append_metrics({"epoch": 2})
    assert len((folder.path / "metrics.jsonl").read_text().splitlines()) == 2
    merged = folder.resume_config({"epochs": 90})
    assert merged.K == 5 and merged.epochs == 90 and merged.out == str(folder.path)


def test_a_reader_writes_nothing(tmp_path):
    folder = RunFolder(tmp_path / "run", writer=False)
    folder.open(Config().resolved(), history=[])
    folder.write_summary({"epochs": 1})
    assert not folder.path.exists()


def test_compatibility_names_the_differing_option():
    config = Config(K=8).resolved()
    check_compatible({**config.to_dict()}, config)
    with pytest.raises(UserInputError, match="--K 8 but the checkpoint has 6"):
        check_compatible({**config.to_dict(), "K": 6}, config)


def test_rng_state_round_trips():
    shuffle = torch.Generator().manual_seed(1)
    state = rng_state(shuffle)
    first = (torch.rand(3), torch.randperm(5, generator=shuffle))
    set_rng_state(state, shuffle)
    again = (torch.rand(3), torch.randperm(5, generator=shuffle))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_overwrite_clears_the_folder_under_the_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "figures").mkdir()
    (out / "figures" / "old.png").write_bytes(b"png")
    folder = RunFolder(out)
    folder.check(resume=False, overwrite=True)
    folder.open(Config(out=str(out)).resolved(), history=[], replace=True)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "metrics.jsonl"]
    with pytest.raises(UserInputError, match=r"in use by another run \(pid \d+\)"):
        RunFolder(out).check(resume=False, overwrite=True)
    folder.close()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl"]


def test_a_refused_default_run_leaves_no_folder_behind(tmp_path):
    """A run refused before it writes removes its numbered folder, and the root if it made it."""
    config = Config().resolved()
    root = tmp_path / "runs"
    folder = RunFolder.create_default(config, root)
    folder.check(resume=False, overwrite=False)
    folder.close()
    assert not root.exists()
    kept = RunFolder.create_default(config, root)  # a root holding another run's folder is kept
    kept.path.joinpath("config.json").write_text("{}")
    refused = RunFolder.create_default(config, root)
    refused.check(resume=False, overwrite=False)
    refused.close()
    assert root.is_dir() and kept.path.is_dir() and not refused.path.exists()
