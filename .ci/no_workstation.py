"""CI: the board-side venv really lacks the workstation stack (else its tests would prove nothing)."""
import importlib.util
import sys

present = [m for m in ("torch", "scalesim", "pandas", "pyarrow", "sklearn") if importlib.util.find_spec(m)]
if present:
    sys.exit(f"board venv has workstation packages: {present}")
print("board venv: no torch, scalesim, pandas, pyarrow, scikit-learn")
