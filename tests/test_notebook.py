"""The quickstart notebook runs as shipped, prints what it computes, and writes only into its
output folder."""

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any("assert " in c.source for c in nb.cells if c.cell_type == "code")  # the notebook teaches, it does not test
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # shipped with its outputs
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    number = r"\s+([-+]?[\d.]+|inf)"
    rows = {m[0]: (float(m[1]), float(m[4])) for m in re.findall(r"^(dense|dit|wanda|sparsegpt)" + number * 4, text, re.M)}
    assert set(rows) == {"dense", "dit", "wanda", "sparsegpt"}
    assert rows["dense"] == (0.0, 0.0) and all(rows[m][0] == 0.5 for m in ("dit", "wanda", "sparsegpt"))
    assert rows["dit"][1] < rows["wanda"][1]  # denoiser error, same calibration and seeds
    assert re.search(r"Int8Tensor zeros: 0\.5\d*", text)
    assert [p.name for p in tmp_path.iterdir()] == ["quickstart_outputs"]
    assert {p.name for p in (tmp_path / "quickstart_outputs").iterdir()} == {"samples.png", "transformer"}
