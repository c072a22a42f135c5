"""The notebook runs the protocol top to bottom on the tiny config and reproduces the command's table."""

from __future__ import annotations

import os

import pytest
from conftest import REPO


@pytest.mark.slow
def test_sft_vs_spin_notebook_executes(tmp_path, cache_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LOWRANK_SPIN_NOTEBOOK_OUTPUT", str(tmp_path))
    notebook = nbformat.read(os.path.join(REPO, "notebooks", "sft_vs_spin.ipynb"), as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}
    ).execute()
    assert (tmp_path / "results.json").exists() and (tmp_path / "accuracy_vs_data_fraction.png").exists()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables == [(tmp_path / "comparison.md").read_text()], (
        "the notebook's table is the command's, from results.json"
    )
    assert "| tspin_50pct | 50% |" in tables[0] and "start (stage-1 SFT)" in tables[0]
