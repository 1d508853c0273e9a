"""The notebook path works: every code cell of notebooks/quickstart.ipynb runs, in order, in one namespace."""
import json
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("MPLBACKEND", "Agg")
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    for cell in cells:
        source = "".join(cell["source"]).replace("\"train.steps=120\"", "\"train.steps=10\"")
        exec(compile(source, f"{NOTEBOOK.name} cell", "exec"), namespace)
    rows = namespace["train_rows"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "runs" / "notebook" / "loss.png").stat().st_size > 1000
    assert int(namespace["state"].step) == 5
