"""Package boundary and shared file writing: energy_models stands alone; writes are atomic."""
from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from energy_models.atomic import atomic_path, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def test_energy_models_imports_nothing_from_ddi_hw():
    # 1) statically: no import statement anywhere in the package names ddi_hw
    offenders = []
    for f in sorted((ROOT / "energy_models").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{f.name}: {n}" for n in names if n == "ddi_hw" or n.startswith("ddi_hw.")]
    assert offenders == []
    # 2) dynamically: importing every module (and profiling a layer) loads no ddi_hw module
    code = ("import sys, torch, energy_models\n"
            "from energy_models import atomic, energy, errors, presets, profile, scalesim_runner, specs\n"
            "specs.extract_specs(torch.nn.Conv2d(3, 4, 3), (1, 3, 8, 8))\n"
            "try:\n    presets.load_preset('no-such-preset')\nexcept errors.UserError:\n    pass\n"
            "print(sorted(m for m in sys.modules if m == 'ddi_hw' or m.startswith('ddi_hw.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_one_error_type_for_both_packages():
    from ddi_hw.errors import UserError
    from energy_models.errors import UserError as EnergyError
    from energy_models.presets import load_preset

    assert UserError is EnergyError
    with pytest.raises(UserError, match="unknown hardware preset"):
        load_preset("no-such-preset")


def test_cli_turns_an_energy_models_error_into_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ddi_hw.cli", "profile", "--arch", "resnet14", "--hardware",
                        "no-such-preset", "--out", str(tmp_path / "p")], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown hardware preset")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_respects_the_umask_like_open(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "new")
        with open(tmp_path / "b.txt", "w") as f:  # what a normal open gives
            f.write("x")
        with atomic_path(tmp_path / "c.csv", suffix=".csv") as tmp:
            tmp.write_text("c")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    modes = {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.txt", "b.txt", "c.csv")}
    assert modes == {"a.txt": want, "b.txt": want, "c.csv": want}
    assert (tmp_path / "a.txt").read_text() == "new" and (tmp_path / "c.csv").read_text() == "c"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old contents\n")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target, suffix=".csv") as tmp:
            tmp.write_text("half of the new cont")
            raise RuntimeError("writer died")
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]

    class Unencodable(str):
        def encode(self, *a):
            raise UnicodeError("cannot encode")
    with pytest.raises(UnicodeError):
        atomic_write_text(target, Unencodable("x"))
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_every_writer_uses_the_one_helper():
    """No module writes a temporary file and renames it itself any more (one home: energy_models.atomic)."""
    hits = []
    for f in sorted(list((ROOT / "ddi_hw").rglob("*.py")) + list((ROOT / "energy_models").rglob("*.py"))):
        if f.name == "atomic.py":
            continue
        text = f.read_text()
        hits += [f.name for needle in ("os.replace(", "mkstemp(", "os.rename(") if needle in text]
    assert hits == []
