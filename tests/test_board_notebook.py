"""The board notebook reads exactly what the CLI writes: its parameter cell's paths are the ones
`ddi-hw export --deploy`, `ddi-hw profile` and `ddi-hw eval` produce, and its runs are committed
checkpoints. Fails when either side renames a file."""
import json
import os
from pathlib import Path

from ddi_hw.deploy.runner import BITFILE, IMAGES_NPY
from ddi_hw.evaluate import SUMMARY_CSV
from ddi_hw.profile_cmd import FILES, default_out

REPO = Path(__file__).resolve().parents[1]


def _params() -> dict:
    nb = json.loads((REPO / "notebooks" / "board_table1.ipynb").read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "ON_BOARD = False" in "".join(c["source"]))
    ns: dict = {}
    cwd = os.getcwd()
    os.chdir(REPO / "notebooks")  # where Jupyter runs it
    try:
        exec("".join(cell["source"]), ns)
    finally:
        os.chdir(cwd)
    return ns


def test_board_notebook_paths_are_the_clis():
    p = _params()
    work = p["WORK"]
    assert work == REPO / "benchmarks"
    assert p["COST_TABLE"] == work / default_out("resnet38", "zedboard") / FILES[0] and FILES[0] == "cost_table.csv"
    assert p["EVAL_SUMMARY"] == work / "eval" / SUMMARY_CSV
    assert p["IMAGES_NPY"] == p["BUNDLES"]["dense"] / IMAGES_NPY
    assert p["BITFILE"] == p["BUNDLES"]["dense"] / BITFILE
    assert p["CHECKPOINTS"].parent == work / "checkpoints"
    for name, folder in p["BUNDLES"].items():  # deploy/NAME of a committed checkpoint
        ckpt = "resnet38_static" if name == "dense" else name
        assert folder == work / "deploy" / ckpt
        assert (p["CHECKPOINTS"] / ckpt / "model.json").is_file(), ckpt
