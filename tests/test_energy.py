"""Eq. 6 worked by hand on one layer, analytic pool/add counts, presets and the table's shape."""
import math

import pytest
import torch
from torch import nn

from ddi_hw.errors import UserError
from energy_models import load_preset, profile_model
from energy_models.presets import available_presets
from energy_models.scalesim_runner import SimLayer, simulate_direct

PRESET = """\
name: tiny
simulator: {array_rows: 4, array_cols: 4, ifmap_sram_kb: 1, filter_sram_kb: 1, ofmap_sram_kb: 1,
            dataflow: os, bandwidth_mode: CALC}
energy: {mac_pj: 0.5, rf_pj: 0.25, noc_pj: 1.5, sram_pj: 3.0, dram_pj: 100.0}
clock_hz: 1000000
static_power_w: 0.002
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(PRESET)
    return p


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, 1, 1, bias=False)
        self.conv.ddi_out_gate = "g0"
        self.conv2 = nn.Conv2d(6, 6, 1, bias=False)
        self.conv2.ddi_in_gate = "g0"
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.pool(y + self.conv2(y))


@pytest.fixture
def table(tiny, tmp_path):
    return profile_model(Net(), (1, 3, 6, 6), tiny, cache_dir=tmp_path / "cache", jobs=1,
                         progress=False)


def test_one_layer_energy_is_eq6_by_hand(table):
    row = table[(table.layer == "conv") & (table.axis == "out") & (table.active == 6)].iloc[0]
    # independent: SCALE-Sim run directly on the padded 8x8 input, 6 filters
    c = simulate_direct(SimLayer(8, 8, 3, 3, 3, 6, 1), dict(
        array_rows=4, array_cols=4, ifmap_sram_kb=1, filter_sram_kb=1, ofmap_sram_kb=1,
        dataflow="os"))
    assert c["macs"] == 6 * 6 * 6 * 3 * 9 == row.macs
    for k, v in c.items():
        assert row[k] == v, k
    dram = c["dram_reads_ifmap"] + c["dram_reads_filter"] + c["dram_writes_ofmap"]
    sram = c["sram_reads_ifmap"] + c["sram_reads_filter"] + c["sram_writes_ofmap"]
    rf = 3 * c["macs"] + c["sram_writes_ofmap"]  # os: 2 operand reads + psum update, drain
    noc = 2 * c["macs"]
    e_dyn = dram * 100.0 + sram * 3.0 + noc * 1.5 + rf * 0.25 + c["macs"] * 0.5
    e_static = 0.002 * c["cycles"] / 1e6 * 1e12
    assert row.rf_accesses == rf and row.noc_accesses == noc
    assert row.e_dram_pj == pytest.approx(dram * 100.0)
    assert row.e_dynamic_pj == pytest.approx(e_dyn)
    assert row.e_static_pj == pytest.approx(e_static)
    assert row.energy_pj == pytest.approx(e_dyn + e_static)
    assert row.latency_s == pytest.approx(c["cycles"] / 1e6)


def test_pool_and_add_are_costed_analytically(table):
    pool = table[(table.kind == "pool") & (table.active == 4)].iloc[0]
    assert pool.source == "analytic" and (pool.in_h, pool.out_h, pool.kernel_h) == (6, 3, 2)
    assert pool.macs == 3 * 3 * 4 * 4 and pool.dram_reads_ifmap == 6 * 6 * 4
    assert pool.cycles == math.ceil(pool.macs / 4) and pool.rf_accesses == 0
    add = table[(table.kind == "add") & (table.active == 6)].iloc[0]
    assert add.macs == 6 * 6 * 6 and add.sram_reads_ifmap == 2 * add.macs
    assert add.energy_pj == pytest.approx(
        (2 * add.macs + add.macs) * (100 + 3) + add.macs * 0.5 + 0.002 * add.cycles * 1e6)


def test_table_rows_follow_the_contract(table):
    for col in ("layer", "kind", "block", "role", "out_gate", "in_gate", "layer_gate", "axis",
                "active", "macs", "cycles", "sram_reads_ifmap", "sram_reads_filter",
                "sram_writes_ofmap", "dram_reads_ifmap", "dram_reads_filter",
                "dram_writes_ofmap", "rf_accesses", "e_dram_pj", "e_sram_pj", "e_rf_pj",
                "e_mac_pj", "e_dynamic_pj", "e_static_pj", "energy_pj", "latency_s"):
        assert col in table.columns, col
    for (layer, axis), g in table.groupby(["layer", "axis"]):
        assert list(g.active) == list(range(len(g)))
        assert g.iloc[0].energy_pj == 0  # nothing active, nothing spent
    assert set(table[table.layer == "conv2"].axis) == {"out", "in"}  # in-gated layer
    assert set(table[table.layer == "conv"].axis) == {"out"}
    conv2_in = table[(table.layer == "conv2") & (table.axis == "in")]
    assert conv2_in.iloc[3].macs == 6 * 6 * 6 * 3  # 3 of 6 input channels active


def test_cycles_step_at_multiples_of_the_array_width(tmp_path):
    """OS dataflow maps output channels onto array columns: cycles only change per fold of 4."""
    conv = nn.Conv2d(4, 12, 3, 1, 1, bias=False)
    df = profile_model(nn.Sequential(conv), (1, 4, 6, 6), load_preset_tiny(tmp_path),
                       cache_dir=tmp_path / "c", jobs=1, progress=False)
    cyc = df[df.axis == "out"].set_index("active").cycles
    assert cyc[1] == cyc[4] < cyc[5] == cyc[8] < cyc[9] == cyc[12]


def load_preset_tiny(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(PRESET)
    return load_preset(p)


def test_shipped_presets_load_with_their_ratios():
    assert {"eyeriss-65nm", "zedboard"} <= set(available_presets())
    e = load_preset("eyeriss-65nm")
    assert (e.dram_pj / e.mac_pj, e.sram_pj / e.mac_pj, e.noc_pj / e.mac_pj,
            e.rf_pj / e.mac_pj) == (200, 6, 2, 1)
    assert (e.array_rows, e.array_cols, e.bandwidth_mode) == (32, 32, "CALC")
    z = load_preset("zedboard")
    assert z.array_rows * z.array_cols <= 220  # DSP48E1 slices on the xc7z020
    assert z.dram_pj > z.sram_pj > z.mac_pj


@pytest.mark.parametrize("edit, field", [
    (("dram_pj: 100.0", "dram_pj: -1"), "energy.dram_pj"),
    (("mac_pj: 0.5", "mac_pj: lots"), "energy.mac_pj"),
    (("array_rows: 4", "array_rows: 4.5"), "simulator.array_rows"),
    (("dataflow: os", "dataflow: rs"), "simulator.dataflow"),
    (("bandwidth_mode: CALC", "bandwidth_mode: USER"), "simulator.bandwidth_mode"),
    (("clock_hz: 1000000", "clock_hz: 0"), "clock_hz"),
    (("rf_pj: 0.25, ", "rf_pj: 0.25, rfx_pj: 1, "), "energy.rfx_pj"),
    (("static_power_w: 0.002", "static_power_w: -2"), "static_power_w"),
    (("energy: {", "energyy: {"), "energyy"),
])
def test_malformed_preset_names_the_field(tmp_path, edit, field):
    p = tmp_path / "my.yaml"
    p.write_text(PRESET.replace(*edit))
    with pytest.raises(UserError) as err:
        load_preset(p)
    msg = str(err.value)
    assert f"'{field}'" in msg and "my.yaml" in msg and "\n" not in msg


def test_missing_section_bad_yaml_and_unknown_names(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\nsimulator: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_preset(p)
    p.write_text("name: x\n")
    with pytest.raises(UserError, match="section 'simulator'"):
        load_preset(p)
    with pytest.raises(UserError, match="unknown hardware preset 'eyeriss'"):
        load_preset("eyeriss")
    with pytest.raises(UserError, match="not found"):
        load_preset(tmp_path / "nope.yaml")


def test_unknown_dataflow_is_a_user_error(tiny, tmp_path):
    with pytest.raises(UserError, match="dataflow"):
        profile_model(nn.Sequential(nn.Conv2d(1, 1, 1)), (1, 1, 2, 2), tiny, dataflow="rs",
                      cache_dir=tmp_path, progress=False)


def test_table_feeds_the_models_cost_table(table):
    from ddi_hw.cost import CostTable

    t = CostTable.from_frame(table)
    row = table[(table.layer == "conv") & (table.axis == "out") & (table.active == 6)].iloc[0]
    assert t.dense("conv", "energy") == pytest.approx(row.energy_pj)
    assert t.dense("conv", "latency") == row.cycles
    half = t.lookup("conv2", "in", torch.tensor([3.0]), "energy")
    three = table[(table.layer == "conv2") & (table.axis == "in") & (table.active == 3)]
    assert float(half) == pytest.approx(three.energy_pj.iloc[0])
