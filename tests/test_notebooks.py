"""The three notebooks run top to bottom offline on a CPU, each within five minutes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))


def test_three_notebooks_are_committed_with_their_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_mask_explorer.ipynb", "03_speed_quality.ipynb"]
    for path in NOTEBOOKS:
        assert path.stat().st_size < 2 * 2**20, f"{path.name} is over 2 MB"
        nb = nbformat.read(path, as_version=4)
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert images and not errors, f"{path.name}: {len(images)} plots, {len(errors)} errors in the committed outputs"


@pytest.mark.usefixtures("tiny_model_path")  # built once, not by each notebook's kernel
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    # The kernel inherits this process's environment: run it as a user's CPU session would, on the
    # PyTorch reference (the suite's TRITON_INTERPRET=1 routes every op through Triton's interpreter).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    # A cell error raises CellExecutionError; a cell over the limit raises a timeout.
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    assert time.perf_counter() - start < 300
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook made no plot"
