"""examples/walkthrough.ipynb runs top to bottom, headless, at its small sizes
(REVDEQ_NOTEBOOK_SMALL=1: the package's own sources as the corpus, no download), and what
it shows holds: the exact reversal matches autograd, reversible memory stays flat."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ipynb"


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_walkthrough_notebook_executes_and_its_numbers_hold(tmp_path, monkeypatch):
    monkeypatch.setenv("REVDEQ_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("REVDEQ_CACHE_DIR", str(tmp_path / "cache"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except CellExecutionError as error:  # the failing cell's source and traceback, not nbclient's internals
        raise AssertionError(f"a notebook cell failed:\n{str(error)[-3000:]}") from None
    text = "\n".join(stream_text(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert "small sizes: True" in text, "the notebook ignored REVDEQ_NOTEBOOK_SMALL=1"
    exact = [float(e) for e in re.findall(r"^\s*\w+\s+\d+\s+exact\s+(\S+)", text, re.M)]
    assert len(exact) == 4 and max(exact) <= 1e-5, f"exact reversal vs autograd, tanh/residual x 16/64 steps: {exact}"
    memory = {kind: [float(m) for m in re.findall(r"N=\d+: ([\d.]+) MB", line)]
              for kind, line in re.findall(r"^\s*(reversible|unrolled): (.*)$", text, re.M)}
    assert memory["unrolled"][-1] > 2 * memory["unrolled"][0], f"unrolled memory should grow with N: {memory}"
    assert memory["reversible"][-1] <= 1.1 * memory["reversible"][0], f"reversible memory should be flat: {memory}"
    assert "stopped (done) at step 20" in text and "val ppl" in text, text[-2000:]
    assert re.search(r"\[(equilibrium|per-evaluation) cache, \d+ tokens/s\]\nROMEO:", text), text[-1000:]
    images = sum(1 for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images == 2, f"expected the memory and the loss plots, got {images} images"
