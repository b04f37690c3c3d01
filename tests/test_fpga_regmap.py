"""The one hardware-interface definition (ddi_hw/deploy/regmap.yaml) vs the generated header and the HLS code."""
import copy
import re
from importlib import resources

import pytest
import yaml

from ddi_hw.deploy.regmap import HEADER_PATH, generate_header, load_regmap, parse_regmap

HLS = HEADER_PATH.parent


def test_committed_header_is_generated_from_yaml():
    assert HEADER_PATH.read_text() == generate_header(), "run: python -m ddi_hw.deploy.regmap"


def test_top_function_arguments_follow_register_order():
    rm = load_regmap()
    src = (HLS / "ddi_engine.h").read_text()
    sig = re.search(rf"void\s+{rm.top}\s*\((.*?)\);", src, re.S).group(1)
    names = [re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", arg.strip()).group(1) for arg in sig.split(",")]
    assert names == [r.name for r in rm.registers]
    # the definition in the .cpp has the same parameter list
    cpp = (HLS / "ddi_engine.cpp").read_text()
    sig_cpp = re.search(rf"void\s+{rm.top}\s*\((.*?)\)\s*{{", cpp, re.S).group(1)
    assert " ".join(sig_cpp.split()) == " ".join(sig.split())


def test_s_axilite_pragmas_match_offsets():
    rm = load_regmap()
    cpp = (HLS / "ddi_engine.cpp").read_text()
    found = re.findall(r"#pragma HLS INTERFACE mode=s_axilite port=(\w+) offset=(0x[0-9A-Fa-f]+)", cpp)
    assert [(p, int(o, 16)) for p, o in found] == [(r.name, r.offset) for r in rm.registers]
    assert "mode=s_axilite port=return" in cpp
    # every pointer register also has an m_axi pragma
    m_axi = set(re.findall(r"mode=m_axi port=(\w+)", cpp))
    assert m_axi == {"input", "weights", "bias", "output", "residual", "pre"}


def test_header_constants_and_flags_are_used_by_engine():
    rm = load_regmap()
    cpp = (HLS / "ddi_engine.cpp").read_text()
    for flag in rm.flags:
        assert f"DDI_{flag}" in cpp, flag
    assert rm.constants["TILE_OUT"] * rm.constants["TILE_IN"] <= 220  # DSP48E1 on the xc7z020


def test_flag_word_and_mask_packing_by_hand():
    rm = load_regmap()
    assert rm.flag_word(kernel=3, stride=2, relu=True, residual=False) == 0b0111
    assert rm.flag_word(kernel=1, stride=1, relu=False, residual=True, pre_affine=True) == 0b11000
    words = rm.mask_words([1, 0, 0, 1] + [0] * 30 + [1])
    assert words[0] == 0b1001 and words[1] == 0b100 and sum(words[2:]) == 0
    with pytest.raises(ValueError):
        rm.flag_word(kernel=5, stride=1, relu=False, residual=False)


def _raw():
    return yaml.safe_load(resources.files("ddi_hw.deploy").joinpath("regmap.yaml").read_text())


def test_parse_rejects_overlap_and_misalignment():
    raw = copy.deepcopy(_raw())
    raw["registers"][1]["offset"] = 0x14  # overlaps input's 8-byte slot
    with pytest.raises(ValueError, match="overlaps"):
        parse_regmap(raw)
    raw = copy.deepcopy(_raw())
    raw["registers"][-1]["offset"] = 0x1C0  # array not aligned to its 128-byte size
    with pytest.raises(ValueError, match="aligned"):
        parse_regmap(raw)
    assert parse_regmap(_raw()) == load_regmap()
