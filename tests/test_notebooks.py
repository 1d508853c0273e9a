"""Every notebook in notebooks/ runs top to bottom in a Jupyter kernel (nbclient), as in Colab, in a fresh working
directory, without its install cell (tagged `install`). The kernel sees one CPU device; sharding.ipynb asks for 8
in its own first cell, as it tells its readers to. Each notebook's printed results are then checked."""
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 600


def run_notebook(name: str, workdir: Path, monkeypatch) -> str:
    """Execute notebooks/<name> in `workdir`; return the text of every stream and text/plain output, in order."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))  # conftest's 8 devices stay out of the kernel
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     skip_cells_with_tag="install", resources={"metadata": {"path": str(workdir)}})
    client.execute()
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


def test_every_notebook_is_tested_and_stored_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(CHECKS)
    for name in names:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear its outputs"
        install = [c for c in code if "install" in c.metadata.get("tags", [])]
        assert len(install) == 1 and "except ImportError" in install[0].source, name


def check_quickstart(text: str, workdir: Path) -> None:
    assert "[CpuDevice(id=0)]" in text
    steps, first, last = re.search(r"quickstart: (\d+) steps, loss ([\d.]+) -> ([\d.]+)", text).groups()
    assert int(steps) == 200 and float(last) < float(first) - 1.5
    assert (workdir / "runs" / "quickstart" / "loss.png").stat().st_size > 10_000
    greedy, drawn = re.search(r"--- temperature 0.0\nThe Python interpreter (.*)\n--- temperature 0.8\n"
                              r"The Python interpreter (.*)\n0 ", text, re.DOTALL).groups()
    assert len(greedy) > 100 and len(drawn) > 100 and greedy != drawn  # 200 bytes each, few of them EOS
    assert len(re.findall(r"^[0-4] \d+\.\d+$", text, re.MULTILINE)) == 5  # the own loop's 5 steps


def check_sharding(text: str, workdir: Path) -> None:
    assert "8 devices: cpu" in text
    assert re.search(r"blocks/w_in\s+\(4, 128, 512\)\s+\('layers', 'embed', 'mlp'\)\s+"
                     r"(P|PartitionSpec)\(None, 'fsdp', 'tensor'\)", text)
    rows = [tuple(map(float, r)) for r in re.findall(r"^\s+\d\s+([\d.]+)\s+([\d.]+)$", text, re.MULTILINE)]
    assert len(rows) == 3 and all(a == pytest.approx(b, rel=1e-5) for a, b in rows)
    difference = float(re.search(r"largest parameter difference after 3 steps: (\S+)", text).group(1))
    assert difference < 1e-4


def check_own_model(text: str, workdir: Path) -> None:
    nnx_accuracy, linen_accuracy = (float(a) for a in re.findall(r"held-out accuracy ([\d.]+)% on 360 images", text))
    assert nnx_accuracy > 90 and linen_accuracy > 90


def check_cost_and_scaling(text: str, workdir: Path) -> None:
    assert re.search(r"h100-sxm\s+\d+\.\d+\s+\d+\.\d+", text)
    for name, tolerance in (("alpha", 0.05), ("beta", 0.05), ("E", 0.1)):
        true, fitted = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)", text, re.MULTILINE).groups()
        assert abs(float(fitted) - float(true)) < tolerance, name
    for png in ("scaling_synthetic.png", "scaling_gpu.png"):
        assert (workdir / png).stat().st_size > 10_000


CHECKS = {"quickstart.ipynb": check_quickstart, "sharding.ipynb": check_sharding, "own_model.ipynb": check_own_model,
          "cost_and_scaling.ipynb": check_cost_and_scaling}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    output = run_notebook(name, tmp_path, monkeypatch)
    assert output.strip(), f"{name} printed nothing"
    CHECKS[name](output, tmp_path)
