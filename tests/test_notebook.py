"""examples/quickstart.ipynb runs start to end, headless, on the demo model (issue 5 proof).

The notebook runs in a fresh python3 kernel of this interpreter (nbclient) with FLASH_MOE_HOME in a
temporary folder and no display; its figures must come out as PNG images (the inline backend draws with Agg).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    env["FLASH_MOE_HOME"] = str(tmp_path / "home")
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2, "both figures are drawn"
    for expected in ("finish reason: ", "tok/s, last token read 16 experts", "share of activations",
                     "ms/token", "decode: ", "page-cache hit rate"):
        assert expected in text, (expected, text[-2000:])
    assert (tmp_path / "home" / "demo" / "converted" / "layout.json").exists()
