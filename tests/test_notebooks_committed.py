"""The notebooks are committed WITH the outputs of one real top-to-bottom run (a reader sees the
plots without running anything), and those outputs name no machine path. CI executes the notebooks
with nbmake, which never writes them back, so these outputs are what `jupyter execute --inplace`
produced (the command each notebook's first cell names)."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|home|tmp|Users|mnt|opt|var)/")


def code_cells(name):
    return [c for c in json.loads((NOTEBOOKS / name).read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", ["board_table1.ipynb", "workstation_tour.ipynb"])
def test_committed_with_outputs_of_one_run(name):
    cells = code_cells(name)
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1)), "not one top-to-bottom run"
    outputs = [o for c in cells for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the committed outputs"


@pytest.mark.parametrize("name", ["board_table1.ipynb", "workstation_tour.ipynb"])
def test_no_machine_paths(name):
    text = (NOTEBOOKS / name).read_text()
    assert not MACHINE_PATH.findall(text), MACHINE_PATH.findall(text)[:3]
    assert "\x1b[" not in text and "\\u001b[" not in text, "terminal escape codes in the outputs"


def test_board_notebook_ends_with_table1_on_cifar10():
    """The committed board run used real CIFAR-10 test images (DDI_DATA_DIR), named by checksum, and
    its last output cell holds the Table I plot."""
    cells = code_cells("board_table1.ipynb")
    text = "".join(t for c in cells for o in c["outputs"] for t in o.get("text", []))
    assert re.search(r"data set: CIFAR-10 sha256:[0-9a-f]{16}", text)
    assert "# Table I" in text
    last = [c for c in cells if c["outputs"]][-1]
    assert any("image/png" in o.get("data", {}) for o in last["outputs"])
