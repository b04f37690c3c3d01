"""Lint of the Vivado/Vitis TCL (the tools are not available here, so the scripts never run in CI):
files they reference exist, and top, IP and port names agree with the C++ and regmap.yaml."""
import re
from pathlib import Path

from ddi_hw.regmap import load_regmap

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
    assert re.search(r"set part\s+(\S+)", HLS_TCL).group(1) == rm.part == re.search(r"set part\s+(\S+)", BD_TCL).group(1)
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
