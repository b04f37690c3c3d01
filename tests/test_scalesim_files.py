"""SCALE-Sim interop: a `.cfg` + energy sidecar is a preset, and `--topology-csv` writes a topology
that plain SCALE-Sim (its own top-level flow) simulates to the table's counts."""
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from energy_models.errors import UserError
from energy_models.presets import load_preset
from energy_models.scalesim_files import cfg_text

SOURCES = {"energy": "Chen et al., ISCA 2016, Table IV", "clock_hz": "Chen et al., JSSC 2017",
           "static_power_w": "ESTIMATE: leakage of a small 65 nm array"}


def write_pair(folder, preset_name="eyeriss-65nm", stem="eyeriss", **changes):
    """A .cfg written from a shipped preset's values and its energy sidecar."""
    p = load_preset(preset_name)
    cfg = folder / f"{stem}.cfg"
    cfg.write_text(cfg_text(p))
    side = dict(name=p.name, description=p.description,
                energy={k: getattr(p, k) for k in ("mac_pj", "rf_pj", "noc_pj", "sram_pj", "dram_pj")},
                clock_hz=p.clock_hz, static_power_w=p.static_power_w, board_power_w=p.board_power_w,
                sources={**SOURCES, "board_power_w": "none: a chip on its own"})
    side.update(changes)
    (folder / f"{stem}.energy.yaml").write_text(yaml.safe_dump(side))
    return cfg


def test_written_cfg_is_read_by_scalesim_itself(tmp_path):
    from scalesim.scale_config import scale_config

    cfg = write_pair(tmp_path)
    sc = scale_config()
    sc.read_conf_file(str(cfg))
    p = load_preset("eyeriss-65nm")
    assert (sc.array_rows, sc.array_cols, sc.ifmap_sz_kb, sc.filter_sz_kb, sc.ofmap_sz_kb, sc.df) == \
        (p.array_rows, p.array_cols, p.ifmap_sram_kb, p.filter_sram_kb, p.ofmap_sram_kb, p.dataflow)
    assert not sc.use_user_bandwidth and not sc.sparsity_support


def test_cfg_plus_sidecar_gives_the_same_table_as_the_preset(tmp_path):
    from ddi_hw.models import create_model
    from energy_models.profile import profile_model

    cfg = write_pair(tmp_path)
    assert load_preset(cfg) == load_preset("eyeriss-65nm")
    model = create_model("resnet14", channel_gates=True, input_size=8)
    a = profile_model(model, (1, 3, 8, 8), "eyeriss-65nm", cache_dir=tmp_path / "c1", jobs=1, progress=False)
    b = profile_model(model, (1, 3, 8, 8), str(cfg), cache_dir=tmp_path / "c2", jobs=1, progress=False)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("edit, expect", [
    (lambda c, s: s.unlink(), "needs its energy sidecar eyeriss.energy.yaml"),
    (lambda c, s: c.write_text(c.read_text().replace("ArrayHeight = 32\n", "")), "ArrayHeight is missing"),
    (lambda c, s: c.write_text(c.read_text().replace("ArrayWidth = 32", "ArrayWidth = wide")),
     "ArrayWidth must be a positive integer"),
    (lambda c, s: c.write_text(c.read_text().replace("= CALC", "= USER")), "InterfaceBandwidth must be CALC"),
    (lambda c, s: c.write_text(c.read_text().replace("SparsitySupport = false", "SparsitySupport = true")),
     "SparsitySupport = true is not supported"),
    (lambda c, s: c.write_text("[general\nrun_name = x"), "not a valid .cfg"),
    (lambda c, s: s.write_text(s.read_text().replace("dram_pj: 200.0", "dram_pj: -1")), "'energy.dram_pj'"),
    (lambda c, s: s.write_text(s.read_text() + "engine: ddi_engine\n"), "unknown field 'engine' (it comes from"),
    (lambda c, s: s.write_text(s.read_text().replace("  clock_hz: Chen et al., JSSC 2017\n", "")),
     "'sources.clock_hz' must cite"),
    (lambda c, s: s.write_text("- a list\n"), "expected a mapping"),
])
def test_bad_cfg_or_sidecar_is_one_line_naming_the_field(tmp_path, edit, expect):
    cfg = write_pair(tmp_path)
    edit(cfg, tmp_path / "eyeriss.energy.yaml")
    with pytest.raises(UserError) as err:
        load_preset(cfg)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_sidecar_exits_2_with_one_line(tmp_path):
    cfg = write_pair(tmp_path)
    (tmp_path / "eyeriss.energy.yaml").unlink()
    res = subprocess.run([sys.executable, "-m", "ddi_hw.cli", "profile", "--arch", "resnet14", "--hardware",
                          str(cfg), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "energy sidecar" in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def _plain_scalesim(cfg, topology, logs, monkeypatch):
    """SCALE-Sim's own top-level flow (what its CLI runs), with the numpy >= 2.4 fix of its write
    buffer (docs/SCALESIM.md); returns its per-layer reports."""
    import scalesim.memory.double_buffered_scratchpad_mem as dbm
    from scalesim.scale_sim import scalesim

    from energy_models.scalesim_runner import _compat_write_buffer

    monkeypatch.setattr(dbm, "wrbuf", _compat_write_buffer)
    layout = logs.parent / "layout.csv"
    layout.write_text("Layer name,\n")
    s = scalesim(save_disk_space=True, verbose=False, config=str(cfg), topology=str(topology),
                 layout=str(layout), input_type_gemm=False)
    s.run_scale(top_path=str(logs))
    (run,) = logs.iterdir()
    read = lambda name: pd.read_csv(run / name, skipinitialspace=True).dropna(axis=1, how="all")  # noqa: E731
    return read("COMPUTE_REPORT.csv"), read("DETAILED_ACCESS_REPORT.csv")


def test_topology_csv_run_by_plain_scalesim_gives_the_table_counts(tmp_path, monkeypatch):
    cfg = write_pair(tmp_path, stem="small")
    text = cfg.read_text()
    for key, value in (("ArrayHeight", 8), ("ArrayWidth", 8), ("IfmapSramSzkB", 2), ("FilterSramSzkB", 1),
                       ("OfmapSramSzkB", 1)):  # small buffers: refetches and drains show up in the counts
        text = "\n".join(f"{key} = {value}" if ln.startswith(f"{key} =") else ln for ln in text.splitlines())
    cfg.write_text(text + "\n")
    topo, out = tmp_path / "net" / "topology.csv", tmp_path / "o"
    res = subprocess.run([sys.executable, "-m", "ddi_hw.cli", "profile", "--arch", "resnet14", "--input-size", "8",
                          "--hardware", str(cfg), "--out", str(out), "--topology-csv", str(topo)],
                         capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "DDI_HW_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(out / "cost_table.csv")
    names = [ln.split(",")[0] for ln in topo.read_text().splitlines()[1:]]
    compute, access = _plain_scalesim(cfg, topo, tmp_path / "logs", monkeypatch)
    assert len(compute) == len(names) == len(access)
    full = table[(table.axis == "out") & (table.active == table.out_ch)].set_index("layer")
    assert set(names) == set(full[full.source.str.startswith("scalesim")].index)  # every simulated layer
    cols = {"Total Cycles": "cycles", "SRAM IFMAP Reads": "sram_reads_ifmap",
            "SRAM Filter Reads": "sram_reads_filter", "SRAM OFMAP Writes": "sram_writes_ofmap",
            "DRAM IFMAP Reads": "dram_reads_ifmap", "DRAM Filter Reads": "dram_reads_filter",
            "DRAM OFMAP Writes": "dram_writes_ofmap"}
    for i, name in enumerate(names):
        rep = {**compute.iloc[i].to_dict(), **access.iloc[i].to_dict()}
        assert {c: int(rep[k]) for k, c in cols.items()} == {c: int(full.loc[name, c]) for c in cols.values()}, name
