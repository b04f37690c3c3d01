"""Checks of the Vivado/Vitis TCL without the tools (not available here): a textual lint (files they
reference exist, top/IP/port names agree with the C++ and regmap.yaml) and a dry run that executes
the scripts in tclsh with recording stubs (fpga/vivado/dryrun.tcl), plus mutations it must catch."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ddi_hw.deploy.regmap import load_regmap

FPGA = Path(__file__).resolve().parent.parent / "fpga"
HLS_TCL = (FPGA / "vivado" / "hls.tcl").read_text()
BD_TCL = (FPGA / "vivado" / "overlay.tcl").read_text()
CPP = (FPGA / "hls" / "ddi_engine.cpp").read_text()


def _balanced(text):
    depth = 0
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', "", text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    return depth == 0


def test_tcl_braces_balanced():
    assert _balanced(HLS_TCL) and _balanced(BD_TCL)


def test_referenced_files_exist():
    refs = re.findall(r"\[file join \$hls_dir ([\w.]+)\]", HLS_TCL)
    assert set(refs) >= {"ddi_engine.cpp", "ddi_engine.h", "regmap.h", "tb_ddi_engine.cpp"}
    for f in refs:
        assert (FPGA / "hls" / f).is_file(), f
    for f in re.findall(r"\[file join \$fpga_dir vivado ([\w.]+)\]", BD_TCL):
        assert (FPGA / "vivado" / f).is_file(), f
    readme = (FPGA / "README.md").read_text()
    for f in re.findall(r"(vivado/[\w.]+\.(?:tcl|xdc))", readme):
        assert (FPGA / f).is_file(), f


def test_top_part_and_ip_names_agree():
    rm = load_regmap()
    assert re.search(r"set top\s+(\w+)", HLS_TCL).group(1) == rm.top
    assert re.search(rf"void\s+{rm.top}\s*\(", CPP)
    assert re.search(r"set part\s+(\S+)", HLS_TCL).group(1) == rm.part == \
        re.search(r"set part\s+(\S+)", BD_TCL).group(1)
    vendor = re.search(r"-vendor (\S+)", HLS_TCL).group(1)
    lib = re.search(r"-library (\S+)", HLS_TCL).group(1)
    ver = re.search(r"-version (\S+)", HLS_TCL).group(1)
    assert f"-vlnv {vendor}:{lib}:{rm.top}:{ver} " in BD_TCL
    assert "hls_ddi_engine" in HLS_TCL and "hls_ddi_engine sol1 impl ip" in BD_TCL


def test_interface_ports_match_cpp_bundles():
    bundles = set(re.findall(r"mode=m_axi port=\w+ offset=slave bundle=(\w+)", CPP))
    used = set(re.findall(r"m_axi_(gmem\d)", BD_TCL))
    assert used == bundles == {"gmem0", "gmem1", "gmem2"}
    # s_axilite without a bundle name -> Vitis names the interface s_axi_control
    assert "bundle=" not in " ".join(l for l in CPP.splitlines() if "s_axilite" in l)
    assert "ddi_engine_0/s_axi_control" in BD_TCL
    xdc = (FPGA / "vivado" / "zedboard_marker.xdc").read_text()
    port = re.search(r"create_bd_intf_port .* (\w+)\n", BD_TCL).group(1)
    assert f"{port}_tri_o[0]" in xdc


def test_overlay_output_is_where_the_board_driver_looks():
    names = re.findall(r"file join \$overlay_dir (ddi_engine\.(?:bit|hwh))", BD_TCL)
    assert sorted(names) == ["ddi_engine.bit", "ddi_engine.hwh"]
    board = (FPGA.parent / "ddi_hw" / "board.py")
    if board.is_file():
        assert '"overlay" / "ddi_engine.bit"' in board.read_text()


# ---------------------------------------------------------------------------------------------
# Dry run: the real scripts EXECUTED in tclsh with recording stubs for every Vivado / Vitis HLS
# command (fpga/vivado/dryrun.tcl). Proves the scripts are self-consistent, not that Vivado accepts
# them or that timing closes.
TCLSH = shutil.which("tclsh")
needs_tclsh = pytest.mark.skipif(TCLSH is None, reason="tclsh not installed (Debian: apt-get install tcl)")
DRYRUN = FPGA / "vivado" / "dryrun.tcl"
HLS_PRAGMAS = re.findall(r"#pragma HLS INTERFACE mode=(m_axi|s_axilite)\b([^\n]*)", CPP)


def _dry_run(*scripts, fpga=FPGA, extra=()):
    """Run the harness on SCRIPTS (names under fpga/vivado), return (exit code, JSON log, stderr)."""
    cmd = [TCLSH, str(DRYRUN), *extra, *[str(fpga / "vivado" / s) for s in scripts]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=fpga.parent)
    log = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, log, proc.stderr


def _calls(log, cmd):
    return [c["args"] for c in log["calls"] if c["cmd"] == cmd]


@pytest.fixture(scope="module")
def full_run():
    from ddi_hw.deploy.board import DEFAULT_BITFILE
    build_existed = (FPGA / "build").exists()
    rc, log, err = _dry_run("hls.tcl", "overlay.tcl", extra=["-overlay", str(DEFAULT_BITFILE)])
    assert rc == 0, err
    # the dry run writes nothing: no build directory appears
    assert (FPGA / "build").exists() == build_existed
    return log


@needs_tclsh
def test_dry_run_hls_records_part_top_and_files(full_run):
    rm = load_regmap()
    assert full_run["ok"] and full_run["error"] is None
    assert _calls(full_run, "set_top") == [[rm.top]]
    assert _calls(full_run, "set_part") == [[rm.part]]
    assert ["-part", rm.part] == _calls(full_run, "create_project")[0][-2:]
    hls = full_run["hls"]
    assert [Path(f).name for f in hls["files"]] == ["ddi_engine.cpp", "ddi_engine.h", "regmap.h"]
    assert [Path(f).name for f in hls["tb_files"]] == ["tb_ddi_engine.cpp"]
    assert float(hls["clock_ns"]) == 10.0
    # C-simulation only runs when the vectors exist (fpga/build/vectors/cases.txt)
    assert bool(_calls(full_run, "csim_design")) == (FPGA / "build" / "vectors" / "cases.txt").is_file()
    # order matters in Vitis HLS: project, top, files, solution, part, clock, synth, export
    order = [c["cmd"] for c in full_run["calls"] if c["tool"] == "vitis_hls"]
    idx = [order.index(c) for c in ("open_project", "set_top", "add_files", "open_solution", "set_part",
                                     "create_clock", "csynth_design", "export_design", "exit")]
    assert idx == sorted(idx)


@needs_tclsh
def test_dry_run_ip_interfaces_come_from_the_cpp_pragmas(full_run):
    # independent reading of the pragmas: m_axi bundle=X -> m_axi_X; s_axilite without bundle -> s_axi_control
    bundles = [re.search(r"bundle=(\w+)", rest).group(1) for mode, rest in HLS_PRAGMAS if mode == "m_axi"]
    want = {f"m_axi_{b}": "Master" for b in bundles}
    want["s_axi_control"] = "Slave"
    assert full_run["hls"]["ip"]["interfaces"] == want
    assert full_run["hls"]["ip"]["vlnv"] == "ddi-hw:hls:ddi_engine:1.0"
    assert full_run["hls"]["ip"]["dir"] == str(FPGA / "build" / "hls_ddi_engine" / "sol1" / "impl" / "ip")
    assert full_run["bd"]["cells"]["ddi_engine_0"]["interfaces"] == want


@needs_tclsh
def test_dry_run_block_design_connections(full_run):
    bd = full_run["bd"]
    nets = {frozenset(n) for n in bd["nets"]}
    peer = {a: b for n in bd["nets"] for a, b in (n, n[::-1])}
    for m in ("m_axi_gmem0", "m_axi_gmem1", "m_axi_gmem2"):
        assert peer[f"/ddi_engine_0/{m}"].startswith("/axi_smc/S0")
    assert frozenset({"/axi_smc/M00_AXI", "/ps7/S_AXI_HP0"}) in nets
    # control path: both AXI-Lite slaves behind the PS general-purpose master
    addr = {tuple(a) for a in bd["addresses"]}
    assert ("/ps7/M_AXI_GP0", "/ddi_engine_0/s_axi_control") in addr
    assert ("/ps7/M_AXI_GP0", "/marker_gpio/S_AXI") in addr
    assert {("/ddi_engine_0/" + m, "/ps7/S_AXI_HP0") for m in ("m_axi_gmem0", "m_axi_gmem1", "m_axi_gmem2")} <= addr
    assert frozenset({"/marker_gpio/GPIO", "/marker"}) in nets
    assert bd["cells"]["ps7"]["config"]["CONFIG.PCW_USE_S_AXI_HP0"] == "1"
    # every clock input runs on FCLK_CLK0 (100 MHz, <= the 10 ns HLS clock)
    assert bd["clocks"]["/ddi_engine_0/ap_clk"] == "/ps7/FCLK_CLK0"
    assert "fclk_within_hls_clock" in full_run["checks"]


@needs_tclsh
def test_dry_run_marker_pin_is_pmod_ja1(full_run):
    # ZedBoard JA1 = Y11 in bank 13 (3.3 V): the only non-PS top-level port is the 1-bit GPIO output
    assert set(full_run["vivado"]["wrapper_ports"]) == {"DDR*", "FIXED_IO*", "marker_tri_o[0]"}
    assert full_run["xdc"] == {"marker_tri_o[0]": {"PACKAGE_PIN": "Y11", "IOSTANDARD": "LVCMOS33"}}


@needs_tclsh
def test_dry_run_overlay_lands_where_board_py_looks(full_run):
    from ddi_hw.deploy.board import DEFAULT_BITFILE
    dst = {Path(d): s for s, d in full_run["copies"]}
    assert set(dst) == {DEFAULT_BITFILE, DEFAULT_BITFILE.with_suffix(".hwh")}
    assert dst[DEFAULT_BITFILE].endswith("ddi_overlay.runs/impl_1/ddi_overlay_wrapper.bit")
    assert dst[DEFAULT_BITFILE.with_suffix(".hwh")].endswith("hw_handoff/ddi_overlay.hwh")
    assert _calls(full_run, "launch_runs") == [["impl_1", "-to_step", "write_bitstream", "-jobs", "4"]]


@needs_tclsh
def test_dry_run_overlay_alone_stops_at_its_own_ip_check():
    rc, log, err = _dry_run("overlay.tcl")
    assert rc == 1 and "no HLS IP at" in log["error"] and log["where"].startswith("overlay.tcl:")


def _mutated(tmp_path, edits=(), delete=()):
    """A copy of fpga/hls + fpga/vivado under tmp_path with EDITS {file: (old, new)} applied."""
    root = tmp_path / "fpga"
    for d in ("hls", "vivado"):
        shutil.copytree(FPGA / d, root / d, ignore=shutil.ignore_patterns("build"))
    for rel, (old, new) in edits:
        p = root / rel
        text = p.read_text()
        assert old in text, f"mutation target {old!r} not in {rel}"
        p.write_text(text.replace(old, new, 1))
    for rel in delete:
        (root / rel).unlink()
    return root


@needs_tclsh
def test_dry_run_of_an_unchanged_copy_passes(tmp_path):
    root = _mutated(tmp_path)
    rc, log, err = _dry_run("hls.tcl", "overlay.tcl", fpga=root)
    assert rc == 0, err
    assert Path(log["copies"][0][1]) == root / "overlay" / "ddi_engine.bit"
    assert not (root / "build").exists() and not (root / "overlay").exists()


MUTATIONS = {
    "misspelled cell": ([("vivado/overlay.tcl",
                          ("[get_bd_intf_pins marker_gpio/GPIO]", "[get_bd_intf_pins marker_gpi/GPIO]"))],
                        (), "overlay.tcl", "no bd cell 'marker_gpi'"),
    "missing source file": ([], ("hls/regmap.h",), "hls.tcl", "file not found"),
    "wrong HLS part": ([("vivado/hls.tcl", ("xc7z020clg484-1", "xc7z020clg400-1"))],
                       (), "hls.tcl", "part 'xc7z020clg400-1' is not xc7z020clg484-1"),
    "wrong Vivado part": ([("vivado/overlay.tcl", ("xc7z020clg484-1", "xc7z010clg400-1"))],
                          (), "overlay.tcl", "part 'xc7z010clg400-1'"),
    "top not in the C++": ([("vivado/hls.tcl", ("set top       ddi_engine", "set top       ddi_engin"))],
                           (), "hls.tcl", "top function 'ddi_engin'"),
    "bundle renamed in C++": ([("hls/ddi_engine.cpp", ("bundle=gmem2", "bundle=gmem_out"))],
                              (), "overlay.tcl", "has no interface 'm_axi_gmem2'"),
    "automation on a connected pin (the bug fixed here)":
        ([("vivado/overlay.tcl", ("[get_bd_intf_pins ddi_engine_0/$m]", "[get_bd_intf_pins ps7/S_AXI_HP0]"))],
         (), "overlay.tcl", "/ps7/S_AXI_HP0 is already connected"),
    "HP0 not enabled": ([("vivado/overlay.tcl", ("CONFIG.PCW_USE_S_AXI_HP0 {1} ", ""))],
                        (), "overlay.tcl", "has no interface 'S_AXI_HP0'"),
    "marker on an LED pin": ([("vivado/zedboard_marker.xdc", ("PACKAGE_PIN Y11", "PACKAGE_PIN T22"))],
                             (), "overlay.tcl", "T22, which is not a ZedBoard PMOD pin"),
    "1.8 V standard": ([("vivado/zedboard_marker.xdc", ("LVCMOS33", "LVCMOS18"))],
                       (), "overlay.tcl", "needs IOSTANDARD LVCMOS33"),
    "XDC port name": ([("vivado/zedboard_marker.xdc", ("PACKAGE_PIN Y11 [get_ports {marker_tri_o[0]}]",
                                                      "PACKAGE_PIN Y11 [get_ports {marker_o[0]}]"))],
                      (), "overlay.tcl", "no top-level port matches 'marker_o[0]'"),
    "overlay copied under another name": ([("vivado/overlay.tcl", ("ddi_engine.bit]", "ddi_overlay.bit]"))],
                                          (), "end of run", "nothing copied to"),
    "no bitstream step": ([("vivado/overlay.tcl", (" -to_step write_bitstream", ""))],
                          (), "overlay.tcl", "no files matched glob pattern"),
    "FCLK faster than the HLS clock": ([("vivado/overlay.tcl", ("FREQMHZ $clock_mhz", "FREQMHZ {150}"))],
                                       (), "end of run", "faster than the HLS target"),
    "typo in a command": ([("vivado/overlay.tcl", ("save_bd_design", "save_bd_desing"))],
                          (), "overlay.tcl", "save_bd_desing: command not modelled"),
    "unknown option": ([("vivado/hls.tcl", ("-flow_target vivado", "-flow vivado"))],
                       (), "hls.tcl", "open_solution: unknown option '-flow'"),
}


@needs_tclsh
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_dry_run_catches_mutation(tmp_path, name):
    edits, delete, where, message = MUTATIONS[name]
    root = _mutated(tmp_path, edits, delete)
    rc, log, err = _dry_run("hls.tcl", "overlay.tcl", fpga=root)
    assert rc == 1, f"{name}: dry run passed"
    assert message in log["error"], log["error"]
    assert log["where"].startswith(where), log["where"]
    assert message in err  # the one-line FAIL message on stderr names the problem too
