"""CI: the board-side venv really lacks the workstation stack and the optional C extension (else its
tests would prove nothing). Usage: python .ci/no_workstation.py SRC (the tree installed there)"""
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

present = [m for m in ("torch", "scalesim", "pandas", "pyarrow", "sklearn") if importlib.util.find_spec(m)]
if present:
    sys.exit(f"board venv has workstation packages: {present}")
pkg = Path(importlib.util.find_spec("ddi_hw").origin).parent
if pkg != (Path(sys.argv[1]) / "ddi_hw").resolve():
    sys.exit(f"board venv imports ddi_hw from {pkg}, not from {sys.argv[1]}")
built = [p.name for s in importlib.machinery.EXTENSION_SUFFIXES for p in (pkg / "models").glob(f"_gatekernels{s}")]
if built:
    sys.exit(f"board venv has the C gate kernels {built}: the no-compiler install was not tested")
print("board venv: no torch, scalesim, pandas, pyarrow, scikit-learn; installed without the C gate kernels")
