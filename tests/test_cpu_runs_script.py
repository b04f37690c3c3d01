"""benchmarks/cifar10_cpu_runs.sh is re-run until everything is done: it must skip finished runs,
resume interrupted ones and start the rest, in its documented order. `ddi-hw` is replaced on PATH by
a recorder (the script's control flow is what is tested; training itself is tested elsewhere)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10_cpu_runs.sh"


def test_script_skips_finished_resumes_interrupted_starts_the_rest(tmp_path):
    bin_dir, out = tmp_path / "bin", tmp_path / "runs"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    fake = bin_dir / "ddi-hw"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    (out / "resnet38_static").mkdir(parents=True)
    (out / "resnet38_static" / "model.safetensors").write_bytes(b"")  # finished
    (out / "resnet20_static").mkdir()
    (out / "resnet20_static" / "resume.safetensors").write_bytes(b"")  # interrupted
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "D": str(tmp_path / "data"), "OUT": str(out),
           "THREADS": "1", "PY": str(fake)}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert f"finished: {out}/resnet38_static" in r.stdout
    calls = log.read_text().splitlines()
    trains = [c for c in calls if c.startswith("train ")]
    outs = [c.split("--out ")[1].split()[0] for c in trains]
    names = [Path(o).name for o in outs]
    assert names == ["iadi_flops50", "iadi_energy50", "iadi_flops60", "iadi_flops70", "iadi_flops50_kd",
                     "resnet20_static", "resnet38_retrain", "resnet14_static", "resnet26_static", "ddi", "ddi_fixed",
                     "iadi_flops50_long", "ddi_long_fixed", "ddi70_fixed", "iadi_flops30", "iadi_flops40",
                     "ddi30_fixed", "ddi40_fixed", "iadi_flops80", "iadi_energy40", "iadi_energy60",
                     "densenet40_static", "densenet40_iadi_flops50", "densenet40_iadi_energy50",
                     "iadi_flops70_long", "ddi70_long_fixed"]
    resumed = [n for n, c in zip(names, trains) if c.endswith("--resume")]
    assert resumed == ["resnet20_static"]
    assert "--target-saving 0.5 --distill 0.7 --data-dir" in trains[names.index("iadi_flops50_kd")]
    assert f"--init {out}/resnet38_static" in trains[names.index("resnet38_retrain")]
    assert "--target-saving 0.5 --steps 6240 --data-dir" in trains[names.index("iadi_flops50_long")]
    assert f"resnet38_ddi_fixed.yaml --init {out}/iadi_flops50_long " in trains[names.index("ddi_long_fixed")]
    ddi70 = trains[names.index("ddi70_fixed")]
    assert "--target-saving 0.7 --steps 6240 --data-dir" in trains[names.index("iadi_flops70_long")]
    assert f"--init {out}/iadi_flops70_long --target-saving 0.7 " in trains[names.index("ddi70_long_fixed")]
    assert f"resnet38_ddi_fixed.yaml --init {out}/iadi_flops70 --target-saving 0.7 " in ddi70
    assert "resnet38_ddi_fixed.yaml --init " + f"{out}/iadi_flops50 " in trains[names.index("ddi_fixed")]
    assert f"--init {out}/iadi_flops30 --target-saving 0.30 " in trains[names.index("ddi30_fixed")]
    assert all("--threads 1" in c and f"--data-dir {tmp_path / 'data'}" in c for c in trains)
    energy = trains[names.index("iadi_energy50")]
    assert "--resource energy --hardware zedboard --target-saving 0.5" in energy
    assert f"--init {out}/resnet38_static" in energy
    assert f"--init {out}/densenet40_static --resource energy" in trains[names.index("densenet40_iadi_energy50")]
    steps = [c.split()[0] for c in calls if not c.startswith("train ")]  # (the Fig. 12 script: its path)
    assert [Path(c).name for c in steps] == ["eval", "energy_aware_training.py", "eval", "table1",
                                             "energy_aware_training.py", "eval"]
    assert calls[-1].split("--out ")[1].split()[0] == f"{out}/eval/table2"


def test_seed_continues_where_another_machine_stopped(tmp_path):
    """SEED folders (the committed runs and pieces): a finished run there is copied, not trained; a piece
    is copied and resumed; a later piece already in OUT is kept."""
    bin_dir, out, seed = tmp_path / "bin", tmp_path / "runs", tmp_path / "seed"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    (bin_dir / "ddi-hw").write_text(f'#!/bin/bash\necho "$@" >> {log}\n')
    (bin_dir / "ddi-hw").chmod(0o755)
    for name, files in {"resnet38_static": ["model.safetensors", "model.json"], "iadi_flops50": ["model.safetensors"],
                        "iadi_energy50": ["resume.safetensors", "metrics.csv"],
                        "iadi_flops60": ["resume.safetensors"]}.items():
        (seed / name).mkdir(parents=True)
        for f in files:
            (seed / name / f).write_text(f"seed {name}/{f}")
    (out / "iadi_flops60").mkdir(parents=True)
    (out / "iadi_flops60" / "resume.safetensors").write_text("later piece")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "D": str(tmp_path / "data"), "OUT": str(out),
           "SEED": f"{tmp_path / 'empty'}:{seed}", "PY": str(bin_dir / "ddi-hw")}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    trains = [c for c in log.read_text().splitlines() if c.startswith("train ")]
    by_name = {Path(c.split("--out ")[1].split()[0]).name: c for c in trains}
    assert "resnet38_static" not in by_name and "iadi_flops50" not in by_name  # copied, not trained
    assert (out / "resnet38_static" / "model.json").read_text() == "seed resnet38_static/model.json"
    assert by_name["iadi_energy50"].endswith("--resume")
    assert (out / "iadi_energy50" / "metrics.csv").read_text() == "seed iadi_energy50/metrics.csv"
    assert by_name["iadi_flops60"].endswith("--resume")
    assert (out / "iadi_flops60" / "resume.safetensors").read_text() == "later piece"
    assert not by_name["iadi_flops70"].endswith("--resume")
