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

    # The first thing shown is a generation that reads like Python, not a line repeated over and over.
    first = next(o for o in outputs if o.output_type in ("stream", "display_data", "execute_result"))
    assert first.output_type == "stream" and first.text.startswith('    def close(self):\n        """Close the file."""\n'), first
    lines = [line for line in first.text.splitlines() if line.strip()]
    # The prompt's two lines and at least one more; the model may end the text (eos) early, but does not loop.
    assert len(lines) >= 3 and len(set(lines)) >= 0.8 * len(lines), first.text
    # Every plot has a title, and its axes say their units.
    plots = [cell.source for cell in nb.cells if cell.cell_type == "code" and "plt.show()" in cell.source]
    assert len(plots) == 2 and all("set_title(" in src for src in plots), plots
    assert "share of reads (%)" in plots[0] and "time per token (ms)" in plots[1], plots


def test_notebook_extra_and_links():
    """pip install -e ".[notebook]" brings what the notebook needs, and the README and usage.md point to it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((NOTEBOOK.parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extras["notebook"]}
    assert {"jupyter", "ipykernel", "matplotlib"} <= names, extras["notebook"]
    for doc in ("README.md", "docs/usage.md"):
        text = (NOTEBOOK.parents[1] / doc).read_text()
        assert "examples/quickstart.ipynb" in text and '.[notebook]' in text, doc
