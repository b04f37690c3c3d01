"""`ddi-hw profile` end to end in a subprocess: outputs, and one-line errors with exit code 2."""
import subprocess
import sys

import pandas as pd

TINY = """\
name: tiny8
simulator: {array_rows: 16, array_cols: 16, ifmap_sram_kb: 16, filter_sram_kb: 16,
            ofmap_sram_kb: 16, dataflow: os, bandwidth_mode: CALC}
energy: {mac_pj: 1, rf_pj: 1, noc_pj: 2, sram_pj: 6, dram_pj: 200}
clock_hz: 200000000
static_power_w: 0.05
"""


def run(*args, env_cache):
    return subprocess.run([sys.executable, "-m", "ddi_hw.cli", "profile", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "DDI_HW_CACHE": str(env_cache),
                               "MPLBACKEND": "Agg"})


def one_line_error(res):
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_unknown_arch(tmp_path):
    msg = one_line_error(run("--arch", "resnet75", "--out", tmp_path / "o", env_cache=tmp_path))
    assert "resnet75" in msg
    assert not (tmp_path / "o").exists()


def test_bad_preset_keeps_earlier_results(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "cost_table.csv").write_text("earlier results\n")
    bad = tmp_path / "my.yaml"
    bad.write_text(TINY.replace("dram_pj: 200", "dram_pj: -5"))
    msg = one_line_error(run("--arch", "resnet20", "--hardware", bad, "--out", out,
                             env_cache=tmp_path))
    assert "my.yaml" in msg and "'energy.dram_pj'" in msg
    assert (out / "cost_table.csv").read_text() == "earlier results\n"
    assert sorted(p.name for p in out.iterdir()) == ["cost_table.csv"]


def test_unknown_preset_name_and_dataflow(tmp_path):
    assert "zedbord" in one_line_error(run("--hardware", "zedbord", env_cache=tmp_path))
    assert "dataflow" in one_line_error(run("--dataflow", "rs", env_cache=tmp_path))


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    msg = one_line_error(run("--arch", "resnet20", "--out", blocker / "sub", env_cache=tmp_path))
    assert "--out" in msg


def test_help_documents_every_option():
    res = subprocess.run([sys.executable, "-m", "ddi_hw.cli", "profile", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for opt in ("--arch", "--hardware", "--dataflow", "--out", "--cache-dir", "--jobs"):
        assert opt in res.stdout


def test_profile_resnet14_writes_table_and_plots(tmp_path):
    preset = tmp_path / "tiny8.yaml"
    preset.write_text(TINY)
    out = tmp_path / "o"
    res = run("--arch", "resnet14", "--hardware", preset, "--out", out, "--jobs", "2",
              "--input-size", 16, env_cache=tmp_path / "cache")  # 16x16 input: 4x less work
    assert res.returncode == 0, res.stderr
    assert "MACs" in res.stdout and "DRAM share" in res.stdout and "simulated" in res.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cost_table.csv", "cost_table.parquet", "energy_per_layer.png",
                     "energy_vs_channels.png"]  # no temp files left behind
    df = pd.read_csv(out / "cost_table.csv")
    pq = pd.read_parquet(out / "cost_table.parquet")
    assert len(df) == len(pq) and list(df.columns) == list(pq.columns)
    dense = df[(df.axis == "out") & (df.active == df.out_ch) & df.kind.isin(["conv", "linear"])
               & (df.role == "backbone")]
    n = 2  # resnet14: 2 blocks per stage; MACs by hand, plain option-A CIFAR ResNet
    full = 3 * 3 * 16 * 16 * 32 * 32
    hand32 = 32 * 32 * 16 * 27 + 2 * n * full + 2 * (full // 2 + (2 * n - 1) * full)
    hand = hand32 // 4 + 640  # every feature map is half as wide and high at 16x16
    assert abs(dense.macs.sum() / hand - 1) < 0.01
    for png in ("energy_per_layer.png", "energy_vs_channels.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    again = run("--arch", "resnet14", "--hardware", preset, "--out", out, "--input-size", 16,
                env_cache=tmp_path / "cache")  # warm cache, same table
    assert again.returncode == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "cost_table.csv"), df)
