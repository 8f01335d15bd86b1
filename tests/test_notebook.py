"""The example notebook executes end to end and its figures render, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "inspect_run.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the outputs before committing"


def test_notebook_executes_and_renders_figures(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PYRO_GMVAE_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("PYRO_GMVAE_RUN", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # ArviZ's once-a-day notice would show
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    # No warning anywhere (tqdm's "IProgress not found" without ipywidgets, ArviZ's notices).
    stderr = "".join(out.get("text", "") for out in outputs if out.output_type == "stream" and out.name == "stderr")
    assert "warn" not in stderr.lower(), stderr
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    # Confidence histogram, samples per cluster, latent scatter, confident examples, ArviZ forest.
    assert len(images) >= 5, f"only {len(images)} figures rendered"
    assert all(len(out["data"]["image/png"]) > 1000 for out in images)
    # Its scratch run goes to a temporary folder, never beside the notebook (Jupyter's working
    # folder is the notebook's, experiments/).
    assert not (tmp_path / "runs").exists() and not (REPO / "experiments" / "runs").exists()
