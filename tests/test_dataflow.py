"""One dataflow for the cost table, the exporter and the engine (energy_models/engines/ddi_engine.yaml).

The table must cost what the C-simulated HLS engine does (its own DRAM-word and cycle counters),
the rows it fuses must be launches the exported bundle makes with the matching engine flags, and
the `zedboard` preset's array, buffers and clock must be the engine's."""
import copy
import dataclasses
import re

import numpy as np
import pytest
import torch

from ddi_hw.deploy import csim
from ddi_hw.deploy.backends import ReferenceBackend
from ddi_hw.deploy.fixedpoint import pooled_sums
from ddi_hw.errors import UserError
from ddi_hw.models import create_model
from energy_models.dataflow import launch_counts, launch_flags, place
from energy_models.engine import load_engine
from energy_models.presets import load_preset
from energy_models.profile import profile_specs

needs_csim = pytest.mark.skipif(csim.toolchain_missing() is not None, reason="no C-sim toolchain")


@pytest.fixture(scope="module")
def gated():
    torch.manual_seed(0)
    m = create_model("resnet14", layer_gates=True, channel_gates=True, channel_gate_kind="cnn")
    return m.eval(), m.specs()


@pytest.fixture(scope="module")
def table(gated, tmp_path_factory):
    _, specs = gated
    return profile_specs(specs, "zedboard", cache_dir=tmp_path_factory.mktemp("cache"), jobs=1,
                         progress=False)


@needs_csim
def test_table_agrees_with_the_c_simulated_engine(gated, table):
    """Every engine launch, dense and at partial channel counts on its gated axis: the table's DRAM
    words within 2 % (the engine also reads biases, which SCALE-Sim has no notion of) and cycles
    within 6 % of the engine's own counters."""
    _, specs = gated
    where, flags = place(specs), launch_flags(specs)
    residual = {p.fused_into for p in where.values() if p.op == "residual_add"}
    rng = np.random.default_rng(0)
    checked = 0
    for s in specs:
        if where[s.name].op not in ("conv", "gate_conv"):
            continue
        cases = [("out", s.out_ch)]
        if s.out_gate:
            cases += [("out", 1), ("out", s.out_ch // 2 + 1)]
        if s.in_gate:
            cases += [("in", 3), ("in", s.in_ch)]
        for axis, a in cases:
            eng = csim.run_spec(s, rng, axis=axis, active=a, residual=s.name in residual,
                                **flags.get(s.name, {}))
            tab = launch_counts(table, s.name, axis, a)
            assert tab["dram_words"] == pytest.approx(eng.dram_words, rel=0.02), (s.name, axis, a)
            assert tab["cycles"] == pytest.approx(eng.counters["cycles"], rel=0.06), (s.name, axis, a)
            checked += 1
    assert checked > 20


@needs_csim
def test_fused_flags_write_pooled_sums_and_leave_buffers_alone():
    """FLAG_POOL: the engine's sums equal the reference's; FLAG_NO_STORE: no ofmap word written;
    FLAG_NO_ZERO: masked channels not written (counted, and the outputs still bit-exact)."""
    for case in csim.standard_cases():
        p = dataclasses.replace(case.params, pool=True)
        r = csim.run_layer_full(case.x, case.w, case.bias, p, case.residual, case.pre, case.out_mask, case.in_mask)
        assert np.array_equal(r.output, case.expected) and np.array_equal(r.pooled, pooled_sums(case.expected))
        assert r.counters["dram_pooled"] == 2 * case.w.shape[0]
        q = dataclasses.replace(p, store=False)
        r2 = csim.run_layer_full(case.x, case.w, case.bias, q, case.residual, case.pre, case.out_mask, case.in_mask)
        assert r2.counters["dram_output"] == 0 and np.array_equal(r2.pooled, r.pooled)
        if case.out_mask is not None:
            z = dataclasses.replace(case.params, zero_masked=False)
            r3 = csim.run_layer_full(case.x, case.w, case.bias, z, case.residual, case.pre, case.out_mask, case.in_mask)
            oh, ow = case.expected.shape[1:]
            assert r3.counters["dram_output"] == int(case.out_mask.sum()) * oh * ow
            assert np.array_equal(r3.output, case.expected)  # the buffer started at 0


def test_fused_rows_are_launches_the_bundle_makes(gated, table, tmp_path):
    """Rows the table fuses are engine launches the exporter flags accordingly, rows it puts on the
    processor are no engine launch, and every engine launch has its own table row."""
    from ddi_hw.deploy.bundle import load_bundle
    from ddi_hw.export import export_model

    m, _ = gated
    b = load_bundle(export_model(m, tmp_path / "b", torch.randn(8, 3, 32, 32)))
    layers = {l.name: l.params for l in b.layers}
    dense = table[(table.axis == "out") & (table.active == table.out_ch)]
    pooled = set(dense[dense.kind == "pool"].fused_into) - {""}
    adds = set(dense[dense.kind == "add"].fused_into) - {""}
    assert pooled and adds and pooled <= set(layers) and adds <= set(layers)
    assert {n for n, p in layers.items() if p.pool} == pooled
    assert {n for n, p in layers.items() if p.residual} == adds
    no_store = set(dense[dense.source == "scalesim, ofmap not stored"].layer)
    assert no_store == {n for n, p in layers.items() if not p.store} == {n for n in layers if ".cgate." in n}
    on_proc = set(dense[dense.source == "processor"].layer)
    assert on_proc and not on_proc & set(layers)
    engine_rows = set(dense[dense.source.str.startswith("scalesim")].layer)
    assert engine_rows == set(layers)
    # conv1 (gated outputs) skips the zero fill: conv2 reads only the same channels
    assert all(not layers[n].zero_masked for n in layers if n.endswith(".conv1"))


def test_gates_and_adds_are_costed_where_they_run(table):
    """Hand counts: the layer gate's pool reads only the pooled vector (2 words per channel), not
    the 32x32 map; the conv that produced the map accumulates and writes those sums (its `.sums` row,
    paid with its launch: the 16 x 32x32 adds, 2 words per channel, the WRITE_POOL loop); the residual
    add is one read per output word and no pass of its own; the gate's vector layers take processor
    time only, charged at the board power."""
    pre = load_preset("zedboard")
    pool = table[(table.layer == "blocks.1.lgate.pool") & (table.active == 16)].iloc[0]
    assert pool.source == "fused into blocks.0.conv2"
    assert (pool.dram_reads_ifmap, pool.dram_writes_ofmap, pool.cycles, pool.macs) == (32, 0, 0, 0)  # was
    # (32, 32, 32) with the sums' adds: the write charged to the gate, also when blocks.0 was skipped
    sums = table[(table.layer == "blocks.0.conv2.sums") & (table.active == 16)].iloc[0]
    # only blocks.1's gate reads them: gate work (the static network would not write them), of blocks.0
    assert (sums.block, sums.role, sums.kind, sums.source) == ("blocks.0", "gate", "sums", "fused into blocks.0.conv2")
    assert (sums.dram_reads_ifmap, sums.dram_writes_ofmap, sums.cycles, sums.macs) == (0, 32, 32, 16 * 32 * 32)
    add = table[(table.layer == "blocks.1.add") & (table.active == 16)].iloc[0]
    assert (add.dram_reads_ifmap, add.dram_writes_ofmap, add.sram_reads_ifmap, add.cycles) == (16 * 32 * 32, 0, 0, 0)
    emb = table[(table.layer == "blocks.1.lgate.conv") & (table.active == 10)].iloc[0]
    assert emb.source == "processor" and emb.macs == 16 * 10 and emb.cycles == 0
    assert emb.energy_pj == pytest.approx(pre.board_power_w * 160 / pre.proc_macs_per_s * 1e12)


@needs_csim
def test_zedboard_preset_is_the_engine(tmp_path):
    """Array, buffers and clock typed once: the preset, the compiled engine and the HLS scripts
    all take them from the engine description."""
    from ddi_hw.deploy.regmap import HEADER_PATH

    eng, pre = load_engine(), load_preset("zedboard")
    c = eng.constants
    assert (pre.array_rows, pre.array_cols) == (c["TILE_IN"], c["TILE_OUT"]) == (8, 16)
    assert pre.clock_hz == eng.clock_mhz * 1e6 and pre.dataflow == "os"
    assert csim.buffer_words() == {"ibuf": eng.ibuf_words, "wbuf": eng.wbuf_words, "acc": eng.acc_words}
    assert f"#define DDI_CLOCK_MHZ {eng.clock_mhz}" in HEADER_PATH.read_text()
    tcl = (HEADER_PATH.parent.parent / "vivado" / "hls.tcl").read_text()
    assert "DDI_CLOCK_MHZ" in tcl and not re.search(r"-period\s+\d", tcl)
    p = tmp_path / "twice.yaml"
    p.write_text("engine: ddi_engine\nclock_hz: 150000000\nenergy: {mac_pj: 1, rf_pj: 1, noc_pj: 1, "
                 "sram_pj: 1, dram_pj: 1}\nstatic_power_w: 0\n")
    with pytest.raises(UserError, match="'clock_hz' comes from engine"):
        load_preset(p)


# ----------------------------------------------------------------------------- DenseNet


def _bn_off_default_gates_open(m) -> None:
    """BN statistics and affine terms away from their defaults; every layer gate open."""
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.normal_(1, 0.2)
            mod.bias.normal_(0, 0.1)
    m.layer_gate.proj.weight.zero_()
    m.layer_gate.proj.bias.fill_(50.0)


def _densenet(kind="cnn", exit_positions=None):
    """Tiny DenseNet-BC with layer gates (all open: every layer runs, so every launch is made) and
    channel gates (light gate, or RNN) that close some channels; BN statistics not at defaults;
    exit branches after the dense layers `exit_positions`, if given."""
    torch.manual_seed(2)
    m = create_model("densenet_tiny", layer_gates=True, channel_gates=True, channel_gate_kind=kind,
                     exits=exit_positions is not None, exit_positions=exit_positions)
    with torch.no_grad():
        _bn_off_default_gates_open(m)
        for layer in m.layers:
            layer.cgate.fc.bias.normal_(0, 1.0)
    return m.eval()


class _Recording(ReferenceBackend):
    """The reference engine, recording every launch's layer name and flags."""

    def __init__(self):
        self.launched = []

    def run_layer(self, layer, x, residual=None, out_mask=None, in_mask=None):
        self.launched.append((layer.name, layer.params.store, layer.params.pool))
        return super().run_layer(layer, x, residual, out_mask, in_mask)


@pytest.fixture(scope="module", params=["cnn", "rnn"], ids=["light-gate", "rnn-gate"])
def dense_case(request, tmp_path_factory):
    from ddi_hw.deploy.bundle import load_bundle
    from ddi_hw.export import export_model

    m = _densenet(request.param)
    specs = m.specs()
    table = profile_specs(specs, "zedboard", cache_dir=tmp_path_factory.mktemp("cache"), jobs=1, progress=False)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    b = load_bundle(export_model(m, tmp_path_factory.mktemp("bundle"), x))
    return m, specs, table, b, x


def test_densenet_launches_are_the_tables_engine_rows(dense_case):
    """The engine launches one image makes (light-gate convs included) are exactly the table's
    engine rows, with the table's store / pool flags: the gate's 1x1/2 conv stored, its 3x3 conv
    writing only pooled sums, and no backbone conv pooling for a pool no single conv produces."""
    from ddi_hw.deploy.backends import run_image

    m, specs, table, b, x = dense_case
    dense = table[(table.axis == "out") & (table.active == table.out_ch)]
    engine = dense[dense.source.str.startswith("scalesim")]
    pooled = set(dense[dense.kind == "pool"].fused_into) - {""}
    want = {(r.layer, r.source != "scalesim, ofmap not stored", r.layer in pooled) for r in engine.itertuples()}
    rec = _Recording()
    r = run_image(b, x[0].numpy(), rec)
    assert all(r.block_run)  # every layer ran
    assert len(rec.launched) == len(set(rec.launched)) == r.launches
    assert set(rec.launched) == want
    gate_convs = {n for n, *_ in rec.launched if ".cgate." in n}
    if m.channel_gate.name == "dense_light":
        assert gate_convs == {f"{n}.cgate.conv{i}" for n in m._names for i in (1, 2)}
        assert {(n, s, p) for n, s, p in rec.launched if n.endswith("cgate.conv2")} == \
            {(f"{n}.cgate.conv2", False, True) for n in m._names}
        assert not any(p for n, _, p in rec.launched if ".cgate." not in n)  # no backbone conv pools
    else:
        assert not gate_convs
        assert [n for n, _, p in rec.launched if p] == ["stem.conv"]  # the first gate's input: one conv


def test_densenet_processor_rows_are_the_runners_map_ops(dense_case):
    """The table's processor rows on maps are the ops the runner does on maps in DRAM: the head's
    pool over the last concatenation and the transitions' 2x2 average pools (same shapes), and the
    gates' pools (the same DRAM words in total: each feature map summed once, when a gate first
    needs it)."""
    from ddi_hw.deploy.backends import run_image

    m, specs, table, b, x = dense_case
    dense = table[(table.axis == "out") & (table.active == table.out_ch)]
    rows = dense[(dense.source == "processor") & (dense.kind == "pool")]
    r = run_image(b, x[1].numpy(), ReferenceBackend())
    assert all(r.block_run)

    def shapes(ops):
        return sorted((tuple(i), tuple(o)) for i, o in ops)
    backbone = rows[rows.role == "backbone"]
    assert shapes(((t.in_ch, t.in_h, t.in_w), (t.out_ch, t.out_h, t.out_w)) for t in backbone.itertuples()) == \
        shapes((i, o) for op, i, o in r.processor_maps if op == "avgpool2" or i[0] == m.fc.in_features)
    words_read = sum(int(np.prod(i)) for _, i, _ in r.processor_maps)
    words_written = sum(int(np.prod(o)) for op, _, o in r.processor_maps if op == "avgpool2")
    assert (words_read, words_written) == (rows.dram_reads_ifmap.sum(), rows.dram_writes_ofmap.sum())
    head = dense[dense.layer == "model.pool"].iloc[0]
    assert head.source == "processor" and head.fused_into == ""
    assert set(dense[dense.layer.str.startswith("transitions.") & (dense.kind == "pool")].source) == {"processor"}


def test_densenet_processor_rows_by_hand(dense_case):
    """Hand counts of the processor's map ops on `zedboard`: one op per element read, the map read
    once, a 2x2 pool's result map written back, processor time only (no cycles, no MAC energy)."""
    m, specs, table, _, _ = dense_case
    pre = load_preset("zedboard")
    head = table[(table.layer == "model.pool") & (table.active == 23)].iloc[0]  # 11 + 3 x 4 channels, 4x4
    assert (head.macs, head.dram_reads_ifmap, head.dram_writes_ofmap, head.cycles) == (23 * 16, 23 * 16, 0, 0)
    assert head.proc_s == pytest.approx(23 * 16 / pre.proc_macs_per_s) and head.e_mac_pj == 0
    assert head.e_dram_pj == pytest.approx(23 * 16 * pre.dram_pj)
    tr = table[(table.layer == "transitions.0.pool") & (table.active == 10)].iloc[0]  # 10 x 16x16 -> 8x8
    assert (tr.macs, tr.dram_reads_ifmap, tr.dram_writes_ofmap) == (10 * 64 * 4, 10 * 256, 10 * 64)
    assert tr.source == "processor" and tr.latency_s == pytest.approx(10 * 256 / pre.proc_macs_per_s)
    # the third layer's gate pools 16 channels (stem 8 + two layers x 4) but reads only the 4 the
    # second layer added: the others' sums are on the processor since the second layer's gate
    g = table[(table.layer == "dense_blocks.0.2.lgate.pool") & (table.active == 16)].iloc[0]
    assert (g.source, g.macs, g.dram_reads_ifmap, g.dram_writes_ofmap) == ("processor", 16 * 256, 4 * 256, 0)
    assert g.proc_s == pytest.approx(4 * 256 / pre.proc_macs_per_s)
    g1 = table[(table.layer == "dense_blocks.0.1.lgate.pool") & (table.active == 12)].iloc[0]
    rnn = m.channel_gate.name == "rnn"  # RNN gates: layer 0's channel gate pooled the stem (fused into it)
    assert g1.dram_reads_ifmap == (4 if rnn else 12) * 256


def test_densenet_decisions_equal_the_float_model_on_reference_and_csim(dense_case):
    """The runner's gate decisions (light gate on the engine) equal the float sparse model's, and
    the C-simulated engine gives the reference's decisions and logits bit for bit."""
    from ddi_hw.deploy.backends import CsimBackend, run_image

    m, _, _, b, x = dense_case
    with torch.no_grad():
        out = m(x, mode="sparse")
    same = 0
    for i in range(len(x)):
        r = run_image(b, x[i].numpy(), ReferenceBackend())
        same += r.block_run == out.block_run[i].int().tolist() and all(
            np.array_equal(r.channel_masks[g], out.channel_decisions[g][i].numpy().astype(np.uint8))
            for g in out.channel_decisions)
        if i < 2 and csim.toolchain_missing() is None:
            c = run_image(b, x[i].numpy(), CsimBackend())
            assert c.block_run == r.block_run and c.launches == r.launches and c.iterations == r.iterations
            assert all(np.array_equal(c.channel_masks[g], v) for g, v in r.channel_masks.items())
            np.testing.assert_array_equal(c.logits, r.logits)
    assert same >= len(x) - 1
    closed = sum(int((1 - v[0]).sum()) for v in out.channel_decisions.values())
    assert closed > 0  # the channel gates really decide


@needs_csim
def test_densenet_table_agrees_with_the_c_simulated_engine(dense_case):
    """Every DenseNet launch (light-gate 1x1/2 conv stored, its 3x3 conv pooled only, pre-affine 1x1
    convs, layers narrower than one output tile): table vs the engine's own counters. Wider bands
    than the ResNet's: on 2x2..16x16 maps the bias and affine words SCALE-Sim does not see, and the
    loop overheads, are a larger share (measured: DRAM 0.91-1.00, cycles 0.96-1.08)."""
    _, specs, table, _, _ = dense_case
    where, flags = place(specs), launch_flags(specs)
    rng = np.random.default_rng(1)
    for s in specs:
        if where[s.name].op not in ("conv", "gate_conv") or s.role == "exit":
            continue
        cases = [("out", s.out_ch)] + ([("out", s.out_ch // 2 + 1)] if s.out_gate else []) + \
            ([("in", 3)] if s.in_gate else [])
        for axis, a in cases:
            eng = csim.run_spec(s, rng, axis=axis, active=a, **flags.get(s.name, {}))
            tab = launch_counts(table, s.name, axis, a)
            assert tab["dram_words"] == pytest.approx(eng.dram_words, rel=0.10), (s.name, axis, a)
            assert tab["cycles"] == pytest.approx(eng.counters["cycles"], rel=0.08), (s.name, axis, a)


# ----------------------------------------------------------------------------- exit branches


def _resnet_with_exits():
    """Tiny gated ResNet-14 with exit branches after blocks 1, 3, 5 (32x32 input: two halvings, one
    4x4 max pool; 16x16: one 2x2; 8x8: one 2x2, to 4x4); layer gates all open (every block runs, so every launch is
    made), CNN channel gates that close some channels; BN statistics not at defaults."""
    torch.manual_seed(3)
    m = create_model("resnet14", layer_gates=True, channel_gates=True, channel_gate_kind="cnn", exits=True,
                     exit_positions=[1, 3, 5])
    with torch.no_grad():
        _bn_off_default_gates_open(m)
        for b in m.blocks:
            if b.cgate is not None:
                b.cgate.fc.bias.normal_(0, 1.0)
    return m.eval()


def _exit_case(m, tmp_path_factory):
    """Model, specs, `zedboard` table, exported bundle, images."""
    from ddi_hw.deploy.bundle import load_bundle
    from ddi_hw.export import export_model

    specs = m.specs()
    table = profile_specs(specs, "zedboard", cache_dir=tmp_path_factory.mktemp("cache"), jobs=1, progress=False)
    x = torch.randn(6, 3, m.input_size, m.input_size, generator=torch.Generator().manual_seed(8))
    b = load_bundle(export_model(m, tmp_path_factory.mktemp("bundle"), x))
    return m, specs, table, b, x


@pytest.fixture(scope="module")
def resnet_exit_case(tmp_path_factory):
    return _exit_case(_resnet_with_exits(), tmp_path_factory)


@pytest.fixture(scope="module", params=["resnet", "densenet"])
def exit_case(request, tmp_path_factory):
    """The ResNet-14 with exits at 32/16/8 pixels, or a DenseNet (light gates) with exits on
    concatenations at 16/8/4 pixels."""
    if request.param == "resnet":
        return request.getfixturevalue("resnet_exit_case")
    return _exit_case(_densenet("cnn", exit_positions=[1, 4, 7]), tmp_path_factory)


def test_exit_launches_are_the_tables_engine_rows(exit_case):
    """An image run to the head, with each exit branch run once (`exit_at`), makes exactly the
    table's engine launches, with its store / pool flags: each exit's conv1 stored, its conv2 writing
    only the pooled sums its global pool reads (that pool fused into it), the exits' FC and the exits'
    max pool no engine launch. (An unlimited budget runs no branch: the image is sure of the head.)"""
    from ddi_hw.deploy.backends import run_image

    m, specs, table, b, x = exit_case
    dense = table[(table.axis == "out") & (table.active == table.out_ch)]
    engine = dense[dense.source.str.startswith("scalesim")]
    pooled = set(dense[dense.kind == "pool"].fused_into) - {""}
    want = {(r.layer, r.source != "scalesim, ofmap not stored", r.layer in pooled) for r in engine.itertuples()}
    rec = _Recording()
    r = run_image(b, x[0].numpy(), rec, budget=1e30)
    assert all(r.block_run) and r.exit_taken == -1 and r.exits_run == []
    assert len(rec.launched) == len(set(rec.launched)) == r.launches
    launched = set(rec.launched)
    for i in range(3):
        one = _Recording()
        r = run_image(b, x[0].numpy(), one, exit_at=i)
        assert r.exits_run == [i] and {n for n, _, _ in one.launched if n.startswith("exits.")} == \
            {f"exits.{i}.conv1", f"exits.{i}.conv2"}  # that branch only
        launched |= set(one.launched)
    assert launched == want
    exits = {(n, s, p) for n, s, p in launched if n.startswith("exits.")}
    assert exits == {(f"exits.{i}.conv{k}", k == 1, k == 2) for i in range(3) for k in (1, 2)}
    ex = dense[dense.role == "exit"]
    assert set(ex[ex.kind == "linear"].source) == {"processor"}
    assert set(ex[(ex.kind == "pool") & (ex.out_h > 1)].source) == {"processor"}
    assert list(ex[(ex.kind == "pool") & (ex.out_h == 1)].fused_into) == [f"exits.{i}.conv2" for i in range(3)]


def test_exit_processor_rows_are_the_runners_map_ops(exit_case):
    """The table's processor rows of exit i are the map ops the runner makes when an image takes
    exit i: one max pool (window = stride = 2^pools, ceil mode), same shapes, reading the exit's input
    map exactly once and writing the pooled map; nothing else reads a map on the processor (every
    other pool is fused). (The calibration's replay of these runs: test_calibration_replay_*.)"""
    from ddi_hw.deploy.backends import run_image

    m, specs, table, b, x = exit_case
    dense = table[(table.axis == "out") & (table.active == table.out_ch)]
    proc_maps = dense[(dense.source == "processor") & (dense.kind == "pool")]
    if m.family == "resnet":  # DenseNet: also its head's, transitions' and gates' pools (tested above)
        assert set(proc_maps.role) == {"exit"}
    steps = [st for st in b.program if st["op"] == "exit"]
    for i in range(3):
        rows = proc_maps[proc_maps.block == f"exits.{i}"]
        rec = _Recording()
        r = run_image(b, x[1].numpy(), rec, exit_at=i)
        ops = [(op, tuple(a), tuple(o)) for op, a, o in r.processor_maps if op == "maxpool"]
        if m.family == "resnet":
            assert len(ops) == len(r.processor_maps)  # no other map op on the processor
        assert r.exit_taken == i and len(rows) == len(ops) == 1  # one pass, however many halvings
        assert ops == [("maxpool", (t.in_ch, t.in_h, t.in_w), (t.out_ch, t.out_h, t.out_w)) for t in rows.itertuples()]
        c, h, w = b.manifest["tensors"][steps[i]["in"]]["shape"]  # the exit's input map, by hand
        k = 2 ** m.exits[i].pools
        assert rows.kernel_h.tolist() == rows.stride.tolist() == [k] == [steps[i]["pool"]]
        assert rows.dram_reads_ifmap.sum() == c * h * w  # read once
        assert rows.dram_writes_ofmap.sum() == c * -(-h // k) * -(-w // k)
        assert [n for n, *_ in rec.launched][-2:] == [f"exits.{i}.conv1", f"exits.{i}.conv2"]


def test_exit_rows_by_hand(resnet_exit_case):
    """Hand counts on `zedboard` of exit 0 (16 x 32x32 input, two halvings): one 4x4 max pool reads
    its map once and writes its 8x8 result (processor time for the elements read, no cycles), conv2
    writes no ofmap, its global pool is 2 words per channel written and read, the FC is processor time only."""
    _, _, table, _, _ = resnet_exit_case
    pre = load_preset("zedboard")

    def row(name):
        return table[(table.layer == name) & (table.axis == "out") & (table.active == table.out_ch)].iloc[0]
    assert sorted(table[table.block == "exits.0"].query("kind == 'pool'").layer.unique()) == \
        ["exits.0.pool#0", "exits.0.pool#1"]  # the max pool and the global pool, nothing else
    p0 = row("exits.0.pool#0")
    assert (p0.kernel_h, p0.stride, p0.source) == (4, 4, "processor")
    assert (p0.macs, p0.dram_reads_ifmap, p0.dram_writes_ofmap, p0.cycles) == (16 * 64 * 16, 16 * 1024, 16 * 64, 0)
    assert p0.proc_s == pytest.approx(16 * 1024 / pre.proc_macs_per_s) and p0.e_mac_pj == 0
    c2 = row("exits.0.conv2")
    assert c2.source == "scalesim, ofmap not stored" and c2.dram_writes_ofmap == 0 and c2.dram_reads_ifmap > 0
    gp = row("exits.0.pool#1")
    assert gp.source == "fused into exits.0.conv2"
    sums = row("exits.0.conv2.sums")  # was one row (128, 128, 128): the write is conv2's, the read the FC's
    assert (gp.dram_reads_ifmap, sums.dram_writes_ofmap, sums.cycles) == (128, 128, 128)
    assert (gp.dram_writes_ofmap, gp.cycles, sums.dram_reads_ifmap, sums.block) == (0, 0, 0, "exits.0")
    fc = row("exits.0.fc")
    assert (fc.source, fc.macs, fc.cycles) == ("processor", 640, 0)
    assert fc.energy_pj == pytest.approx(pre.board_power_w * 640 / pre.proc_macs_per_s * 1e12)


def _successive_2x2_ceil(a: list[list[int]], k: int) -> list[list[int]]:
    """k 2x2 max pools, stride 2, ceil mode, by definition (windows clipped at the edge), in plain Python."""
    for _ in range(k):
        h, w = len(a), len(a[0])
        a = [[max(a[y][x] for y in range(2 * i, min(2 * i + 2, h)) for x in range(2 * j, min(2 * j + 2, w)))
              for j in range(-(-w // 2))] for i in range(-(-h // 2))]
    return a


def test_one_max_pool_pass_equals_successive_2x2_pools():
    """Brute force of the claim the exits rely on: k successive 2x2 ceil-mode max pools == one
    2^k x 2^k max pool with stride 2^k, ceil mode, for every size 1..13 x 1..13 (odd included) and
    k = 1..3, on int16 maps with negative values and the int16 extremes: the runner's numpy pass
    (`maxpool_ceil`) and torch's one `max_pool2d` the float model runs, both bit for bit."""
    import torch.nn.functional as F

    from ddi_hw.deploy.processor import maxpool_ceil

    rng = np.random.default_rng(5)
    for h in range(1, 14):
        for w in range(1, 14):
            x = rng.integers(-32768, 32768, size=(2, h, w), dtype=np.int16)
            x[0, rng.integers(h), rng.integers(w)] = -32768
            x[1] = -32768  # an all-minimum channel: the edge padding must not win
            for k in (1, 2, 3):
                want = np.array([_successive_2x2_ceil(ch.tolist(), k) for ch in x], dtype=np.int16)
                got = maxpool_ceil(x, 2 ** k)
                assert got.dtype == np.int16 and np.array_equal(got, want), (h, w, k)
                t = F.max_pool2d(torch.from_numpy(x.astype(np.float32))[None], 2 ** k, ceil_mode=True)[0]
                assert np.array_equal(t.numpy(), want.astype(np.float32)), (h, w, k)


@pytest.mark.parametrize("size", [2, 5, 7, 9, 13, 15, 16, 17, 31, 32, 33, 56, 63])
def test_exit_branch_one_pass_is_bit_exact_to_the_2x2_loop(size):
    """The float exit branch's one max pool gives bit for bit the logits of its former loop of
    2x2 ceil-mode pools, on every size an exit can see (odd ones included: ImageNet maps are 7, 14,
    28, 56; an odd map is where ceil mode clips)."""
    import torch.nn.functional as F

    from ddi_hw.models.exits import ExitBranch

    torch.manual_seed(size)
    e = ExitBranch(3, size, 10).eval()
    assert e.pools >= 1 and e.window == 2 ** e.pools
    x = torch.randn(2, 3, size, size)
    y = x
    for _ in range(e.pools):
        y = F.max_pool2d(y, 2, ceil_mode=True)
    loop = e.fc(F.relu(e.bn2(e.conv2(F.relu(e.bn1(e.conv1(y)))))).mean((2, 3)))
    with torch.no_grad():
        assert torch.equal(e(x), loop.detach())
        assert torch.equal(F.max_pool2d(x, e.window, ceil_mode=True), y)


def test_exit_logits_equal_the_float_model_and_csim_the_reference(exit_case):
    """Every exit's logits from the deployed path (integer one-pass max pool, engine convs, FC on the pooled
    sums) equal the float model's exit logits to fixed-point tolerance, and the C-simulated engine
    gives the reference's logits, launches and iterations bit for bit."""
    from ddi_hw.deploy.backends import CsimBackend, run_image

    m, _, _, b, x = exit_case
    with torch.no_grad():
        ref = m(x, mode="dense").exit_logits
    for i in range(3):
        for n in range(3):
            r = run_image(b, x[n].numpy(), ReferenceBackend(), exit_at=i)
            f = ref[i][n].numpy()
            assert np.abs(r.logits - f).max() <= 2e-3 * max(1.0, float(np.abs(f).max())), (i, n)
            if n == 0 and csim.toolchain_missing() is None:
                c = run_image(b, x[n].numpy(), CsimBackend(), exit_at=i)
                assert (c.launches, c.iterations, c.block_run) == (r.launches, r.iterations, r.block_run)
                np.testing.assert_array_equal(c.logits, r.logits)


@needs_csim
def test_exit_table_agrees_with_the_c_simulated_engine(exit_case):
    """The exit branches' launches (3x3 convs on 8x8 / 4x4 maps; conv2 pooled only): table vs the
    engine's own counters, with the DenseNet test's bands (small maps: bias words and loop overheads
    are a larger share)."""
    _, specs, table, _, _ = exit_case
    where, flags = place(specs), launch_flags(specs)
    checked = 0
    rng = np.random.default_rng(2)
    for s in specs:
        if s.role != "exit" or where[s.name].op != "conv":
            continue
        eng = csim.run_spec(s, rng, **flags.get(s.name, {}))
        tab = launch_counts(table, s.name, "out", s.out_ch)
        assert tab["dram_words"] == pytest.approx(eng.dram_words, rel=0.10), s.name
        assert tab["cycles"] == pytest.approx(eng.counters["cycles"], rel=0.08), s.name
        checked += 1
    assert checked == 6


# ----------------------------------------------------------------------------- calibration replay


class _Reads(dict):
    """The bundle's processor tensors, logging every read (which of the ARM's layers ran)."""

    def __init__(self, d):
        super().__init__(d)
        self.log = []

    def __getitem__(self, key):
        self.log.append(key)
        return super().__getitem__(key)


class _LaunchLog(ReferenceBackend):
    """The reference engine, logging every launch as its table row (layer, axis, active) and
    whether it added a residual."""

    def __init__(self):
        self.log = []

    def run_layer(self, layer, x, residual=None, out_mask=None, in_mask=None):
        if out_mask is not None:
            key = (layer.name, "out", int(out_mask.sum()))
        elif in_mask is not None:
            key = (layer.name, "in", int(in_mask.sum()))
        else:
            key = (layer.name, "out", layer.out_ch)
        self.log.append((key, residual is not None, layer.params.pool))
        return super().run_layer(layer, x, residual, out_mask, in_mask)


def _random_gates(b, seed):
    """The bundle with random layer-gate projections and channel-gate biases: some blocks skipped,
    some channels closed (the fixture's gates leave every block open)."""
    rng = np.random.default_rng(seed)
    p = dict(b.processor)
    p["layer_gate.proj.weight"] = rng.normal(0, 3, p["layer_gate.proj.weight"].shape).astype(np.float32)
    p["layer_gate.proj.bias"] = np.zeros(1, np.float32)
    for k in sorted(p):  # (a safetensors load's key order varies from run to run)
        if k.endswith("lgate.conv.bias"):  # each block's LSTM input apart: mixed decisions
            p[k] = rng.normal(0, 3.0, p[k].shape).astype(np.float32)
        if k.endswith("cgate.fc.bias"):
            p[k] = rng.normal(0, 1.0, p[k].shape).astype(np.float32)
    return dataclasses.replace(b, processor=_Reads(p))


def _logged_rows(table, launches, reads, maps, skipped=()):
    """Table rows of the ops one image's run logged, mapped by hand: each engine launch; the residual
    add fused into a launch that added one; the pooled sums a launch wrote (FLAG_POOL: its `.sums`
    row); each ARM layer whose weights the processor read (the shared LSTM's n-th step is row #n);
    the global pool (the read of the sums) whose vector that layer or gate conv consumed; each map the
    runner pooled in one pass (2x2 average, exit max pool), by its shapes; each copy the runner made
    of a skipped layer's features, in program order of the `skipped` layers (DenseNet), of their shape."""
    dense = table[(table.axis == "out") & (table.active == table.out_ch)].set_index("layer")
    rows = []

    def pooled_for(owner):  # the global pool whose vector `owner` reads
        name = "model.pool" if owner == "" else next(
            n for n in dense.index if n.startswith(owner + ".pool") and dense.out_h[n] * dense.out_w[n] == 1)
        rows.append((name, "out", int(dense.out_ch[name])))

    for key, residual, pool in launches:
        rows.append(key)
        if pool:
            rows.append((key[0] + ".sums", "out", int(dense.out_ch[key[0]])))
        if residual:
            add = dense[(dense.kind == "add") & (dense.fused_into == key[0])]
            rows.append((add.index[0], "out", int(add.out_ch.iloc[0])))
        if ".cgate." in key[0] and dense.source[key[0]] == "scalesim, ofmap not stored":
            pooled_for(key[0].rsplit(".", 1)[0])  # a channel gate's last conv: its pooled sums
        if key[0].startswith("exits.") and key[0].endswith(".conv2"):
            pooled_for(key[0].rsplit(".", 1)[0])
    steps = 0  # calls of the shared LSTM so far
    for k in reads:
        if k == "layer_gate.lstm.weight_ih":
            names = [f"layer_gate.lstm#{steps}.ih", f"layer_gate.lstm#{steps}.hh"]
        elif k == "layer_gate.proj.weight":
            names, steps = [f"layer_gate.proj#{steps}"], steps + 1
        elif k.endswith(".weight") and not k.startswith("layer_gate."):
            names = [k[: -len(".weight")]]
            if names[0] == "fc" or names[0].endswith(".lgate.conv"):  # head, layer gate: a pooled input
                pooled_for("" if names[0] == "fc" else names[0].rsplit(".", 1)[0])
        else:
            continue
        rows += [(n, "out", int(dense.out_ch[n])) for n in names]
    proc = dense[(dense.source == "processor") & (dense.kind == "pool") & (dense.out_h * dense.out_w > 1)]
    for op, a, o in maps:
        if op in ("avgpool2", "maxpool"):
            hit = proc[(proc.in_ch == a[0]) & (proc.in_h == a[1]) & (proc.out_h == o[1])]
            assert len(hit) == 1, (op, a, o)
            rows.append((hit.index[0], "out", int(hit.out_ch.iloc[0])))
    copies = [(a, o) for op, a, o in maps if op == "copy"]
    assert len(copies) == len(skipped)
    for name, (a, o) in zip(skipped, copies):
        row = dense.loc[name + ".skip_copy"]
        assert tuple(a) == tuple(o) == (row.out_ch, row.out_h, row.out_w)
        rows.append((name + ".skip_copy", "out", int(row.out_ch)))
    return rows


def _skipped_copies(m, r) -> list[str]:
    """The layers whose skip the runner answers with a copy (DenseNet), in program order."""
    return [m.block_names[j] for j, ran in enumerate(r.block_run) if not ran] if m.family == "densenet" else []


def _runs(b, x, n_exits):
    """Every way an image runs: to the head, stopped at each exit, under a tight and a loose budget,
    and under budgets that stop it inside blocks (`_inside_budgets`); (mode with the image's index,
    result, launches, processor reads)."""
    from ddi_hw.deploy.backends import run_image

    plan = b.manifest["cost_plan"]
    static = sum(e["cost"] if e["kind"] == "fixed" else e["f"] + e["V"][-1] if e["kind"] == "block" else 0.0
                 for e in plan["events"])
    out = []
    for n in range(len(x)):
        modes = [{}] + [{"exit_at": i} for i in range(n_exits)] + [{"budget": static * f} for f in (0.3, 0.6, 5)]
        for mode in modes:
            be = _LaunchLog()
            b.processor.log = []
            r = run_image(b, x[n].numpy(), be, **mode)
            out.append(({**mode, "image": n}, r, be.log, list(b.processor.log)))
            if not mode:
                modes += [{"budget": v} for v in _inside_budgets(b, r)]
    return out


def _inside_budgets(b, r):
    """Budgets that stop the image of the unbudgeted run `r`: one for each kind of stop (at an exit,
    inside a block before its channel gate, after it) that some budget up to the static network
    makes, found by scanning budgets with the rule on r's decisions (the rule itself is tested
    against brute force in test_budget.py and test_sparse_equivalence.py).
    No stop inside a block when no budget can make one (every exit branch costs more than the spread
    of the blocks up to the next exit: an image not sure of the next exit then stops at the exit)."""
    from ddi_hw.deploy.budget import BudgetPlan, walk

    plan = b.manifest["cost_plan"]
    bp = BudgetPlan(plan)
    steps = {st["index"]: st for st in b.program if st["op"] == "block"}
    L = np.array([[float(v) for v in r.block_run]])
    k = np.array([[float(r.channel_masks[steps[j]["channel_gate"]["name"]].sum())
                   if (steps[j].get("channel_gate") or {}).get("name") in r.channel_masks else float(bp.K[j])
                   for j in range(bp.J)]])
    static = sum(e["cost"] if e["kind"] == "fixed" else e["f"] + e["V"][-1] if e["kind"] == "block" else 0.0
                 for e in plan["events"])
    found = {}
    for budget in np.linspace(0.0, static, 801)[1:]:
        w = walk(bp, float(budget), L, k)
        if w.stop_col[0] < bp.S:  # stopped: at an exit (stage 0) or inside a block (stage 1, 2)
            found.setdefault(int(w.stage[0]), []).append(float(budget))
    return [v[len(v) // 2] for v in found.values()]


def _spread(b) -> float:
    """> 0 when a budget can stop an image inside a block or let it go on past an exit branch it ran:
    the blocks up to some exit cost more at their dearest than at their cheapest by more than the
    branch before them."""
    from ddi_hw.deploy.budget import BudgetPlan

    bp = BudgetPlan(b.manifest["cost_plan"])
    return max(bp.worst[c] - bp.rest[c] - bp.cost[c] for c in bp.exit_col)


def test_calibration_replay_is_what_the_runner_ran(exit_case):
    """The calibration replay (`executed_rows`, from the program and the image's decisions) names
    exactly the table rows of the ops the runner performed (the launch log, the processor's tensor
    reads, its map ops), for random gate decisions, every exit, and budgets (with the fallback
    branches they ran); `counts_from_runs` sums exactly those rows."""
    import pandas as pd

    from ddi_hw.calibrate import config_counts, counts_from_runs, executed_rows

    m, specs, table, b, x = exit_case
    b = _random_gates(b, 4)
    runs = _runs(b, x[:4], len(m.exits))
    skipped = closed = fallbacks = 0
    stops = set()
    for mode, r, launches, reads in runs:
        want = _logged_rows(table, launches, reads, r.processor_maps, _skipped_copies(m, r))
        assert sorted(executed_rows(table, b, r)) == sorted(want), mode
        skipped += r.block_run.count(0)
        closed += sum(int((1 - v).sum()) for v in r.channel_masks.values())
        if "budget" in mode:
            fallbacks += len(r.exits_run) > 1 or (len(r.exits_run) == 1 and r.exit_taken == -1)
            stops.add("exit" if r.stopped_at >= 0 else "head" if r.stopped_block < 0 else
                      "channel gate" if r.stopped_after_channel_gate else "layer gate")
    assert skipped and closed and {"exit", "head"} <= stops  # the decisions really vary
    # where the plan allows it (`_spread`), budgets run a fallback branch and go on past it, and stop
    # images inside blocks too (which kinds of stop occur depends on the random gates)
    assert (fallbacks > 0) == (_spread(b) > 0) == bool(stops & {"layer gate", "channel gate"})
    idx = table.set_index(["layer", "axis", "active"])
    results = [r for _, r, _, _ in runs]
    logged = [k for _, r, la, re in runs for k in _logged_rows(table, la, re, r.processor_maps, _skipped_copies(m, r))]
    want = config_counts(idx.loc[pd.MultiIndex.from_tuples(logged)].reset_index())
    got = counts_from_runs(table, b, results)
    assert got == pytest.approx({k: v / len(results) for k, v in want.items()}, rel=1e-12)
    assert got["proc_s"] > 0


def test_budgeted_runs_cost_what_the_model_and_the_replay_cost(exit_case):
    """Under budgets that stop images at exits and inside blocks: the runner's `cost` (the exported
    plan), the model's cost on the runner's decisions (dense and sparse path) and the calibration
    replay's rows agree per image, in every metric; the model stops where the runner stopped, and
    the runner never spends more than the budget unless its path to exit 0 already does."""
    from ddi_hw.calibrate import executed_rows
    from ddi_hw.cost import CostTable

    m, specs, table, b, x = exit_case
    b = _random_gates(b, 4)
    m = copy.deepcopy(m).attach_cost_table(CostTable.from_frame(table))
    plan = m.plan
    idx = table.set_index(["layer", "axis", "active"])
    inside = 0
    for mode, r, _, _ in _runs(b, x[:4], len(m.exits)):
        if "budget" not in mode:
            continue
        n_img, budget = mode["image"], mode["budget"]
        run = r.block_run + [1] * (plan.J - len(r.block_run))  # the stopped block: it decided to run
        force = {"layer": torch.tensor([[run[j] for j in m.skippable_idx]], dtype=torch.float32),
                 "channel": {g: torch.tensor(r.channel_masks[g][None] if g in r.channel_masks else np.ones((1, K)),
                                             dtype=torch.float32) for g, K in m.gate_widths.items()}}
        rows = idx.loc[executed_rows(table, b, r)]
        assert 2 * rows["macs"].sum() == pytest.approx(r.cost, rel=1e-9), mode
        if r.exit_taken != 0 or r.stopped_at != 0:
            assert r.cost <= budget
        for path in ("dense", "sparse"):
            with torch.no_grad():
                out = m(x[n_img:n_img + 1], mode=path, force=force, budget=budget)
            assert int(out.exit_taken[0]) == r.exit_taken and int(out.stopped_block[0]) == r.stopped_block, mode
            assert float(out.cost["flops"][0]) == pytest.approx(r.cost, rel=1e-12)
            for metric, col in (("energy", "energy_pj"), ("latency", "cycles")):
                assert float(out.cost[metric][0]) == pytest.approx(rows[col].sum(), rel=1e-9), (mode, metric)
        inside += r.stopped_block >= 0
    assert (inside > 0) == (_spread(b) > 0)


def test_calibration_replay_costs_what_the_model_costs(exit_case):
    """Per image, the replayed rows' energy (and MACs, cycles) equal the model's own cost path
    (`CostPlan`, the events the training loss and `ddi-hw eval` read) for the same decisions: to the
    head, and at each exit (the events up to it, plus that branch)."""
    from ddi_hw.calibrate import executed_rows
    from ddi_hw.cost import CostTable

    m, specs, table, b, x = exit_case
    b = _random_gates(b, 4)
    m = copy.deepcopy(m).attach_cost_table(CostTable.from_frame(table))
    plan = m.plan
    idx = table.set_index(["layer", "axis", "active"])
    for mode, r, _, _ in _runs(b, x[:4], len(m.exits)):
        if "budget" in mode:
            continue  # test_budgeted_runs_cost_what_the_model_and_the_replay_cost
        L = torch.tensor([r.block_run + [1] * (plan.J - len(r.block_run))])  # blocks past an exit: not summed
        k = torch.tensor([[int(r.channel_masks[g].sum()) if (g := f"{m.block_names[j]}.cgate") in r.channel_masks
                           else int(plan.K[j]) for j in range(plan.J)]], dtype=torch.float64)
        rows = idx.loc[executed_rows(table, b, r)]
        for metric, col, scale in (("energy", "energy_pj", 1), ("latency", "cycles", 1), ("flops", "macs", 2)):
            ev = plan.events_matrix(L, k, metric, with_exits=False)[0]
            if r.exit_taken >= 0:
                col_i = int(plan.exit_cols[r.exit_taken])
                want = float(ev[:col_i].sum() + plan.exit[metric][r.exit_taken])
            else:
                want = float(ev.sum())
            assert scale * rows[col].sum() == pytest.approx(want, rel=1e-9), (mode, metric)


# ----------------------------------------------------------------------------- what a skip costs


def test_skip_copy_row_by_hand(dense_case):
    """A skipped dense layer's features are the previous layer's, copied by the processor into the
    layer's slot of the block buffer: growth 4 maps of 16x16 = 1024 words read and 1024 written over
    DRAM, one processor op per word read, no MACs (FLOPs 0), no engine cycles; paid only when the
    layer is skipped (the cost plan's s, and the gradient of the expected cost in the run decision is
    f + c + V(k) - s). The first layer of a block cannot be skipped: no row."""
    from ddi_hw.cost import CostTable

    m, _, table, _, _ = dense_case
    pre = load_preset("zedboard")
    row = table[(table.layer == "dense_blocks.0.1.skip_copy") & (table.active == 4)].iloc[0]
    assert (row.kind, row.block, row.source) == ("copy", "dense_blocks.0.1", "processor, skipped-layer copy")
    assert (row.macs, row.dram_reads_ifmap, row.dram_writes_ofmap, row.cycles) == (0, 4 * 256, 4 * 256, 0)
    assert row.proc_s == pytest.approx(1024 / pre.proc_macs_per_s) and row.e_mac_pj == 0
    assert row.energy_pj == pytest.approx(2048 * pre.dram_pj + pre.board_power_w * 1024 / pre.proc_macs_per_s * 1e12)
    copies = set(table[table.kind == "copy"].layer)
    assert copies == {f"{n}{'.skip_copy'}" for n, s in zip(m.block_names, m.block_skippable) if s}
    mm = copy.deepcopy(m).attach_cost_table(CostTable.from_frame(table))
    plan, j = mm.plan, mm.block_names.index("dense_blocks.0.1")
    assert float(plan.s["energy"][j]) == pytest.approx(row.energy_pj) and float(plan.s["flops"][j]) == 0
    assert float(plan.s["energy"][0]) == 0  # dense_blocks.0.0: never skipped
    L = torch.full((1, plan.J), 0.5, dtype=torch.float64, requires_grad=True)
    k = plan.K[None].clone()
    plan.events_matrix(L, k, "energy", with_exits=False).sum().backward()
    run = plan.f["energy"] + plan.c["energy"] + plan.V["energy"][torch.arange(plan.J), plan.K.long()]
    assert torch.allclose(L.grad[0], run - plan.s["energy"])


def test_a_skipped_dense_layer_is_copied_once_and_costed_so(dense_case):
    """The runner answers each skipped dense layer with exactly one copy (its map-op log) of the
    previous layer's features: growth maps of the layer's output size, the `.skip_copy` row's shape."""
    from ddi_hw.deploy.backends import run_image

    m, _, table, b, x = dense_case
    b = _random_gates(b, 4)
    copies = skipped = 0
    for n in range(len(x)):
        r = run_image(b, x[n].numpy(), ReferenceBackend())
        names = _skipped_copies(m, r)
        ops = [(a, o) for op, a, o in r.processor_maps if op == "copy"]
        assert len(ops) == len(names)
        for name, (a, o) in zip(names, ops):
            row = table[(table.layer == name + ".skip_copy") & (table.active == table.out_ch)].iloc[0]
            j = m.block_names.index(name)
            assert tuple(a) == tuple(o) == tuple(b.manifest["tensors"][f"d{j}.y"]["shape"]) == \
                (m.layers[j].growth, row.out_h, row.out_w) == (row.out_ch, row.out_h, row.out_w)
        copies += len(ops)
        skipped += r.block_run.count(0)
    assert copies == skipped > 0


def test_pooled_sums_are_charged_where_the_engine_writes_them(exit_case):
    """Per image, with random decisions (skipped blocks, closed channels, exits, budgets): the pooled-sum
    words the replay charges as written (`.sums` rows) are exactly those of the launches that wrote
    pooled sums (FLAG_POOL: 2 words per output channel, the launch log), and every pooled vector the
    processor used is charged one read (2 words per channel) -- also after a skipped ResNet block,
    whose next gate reads the sums of the block's input, which an earlier conv wrote."""
    from ddi_hw.calibrate import executed_rows

    m, _, table, b, x = exit_case
    b = _random_gates(b, 4)
    idx = table.set_index(["layer", "axis", "active"])
    reused = 0
    for mode, r, launches, _ in _runs(b, x[:4], len(m.exits)):
        rows = idx.loc[executed_rows(table, b, r)]
        written = 2 * sum(int(table[(table.layer == key[0])].out_ch.iloc[0]) for key, _, pool in launches if pool)
        pooled = (rows.kind == "sums") | ((rows.kind == "pool") & (rows.out_h * rows.out_w == 1))
        assert rows[pooled].dram_writes_ofmap.sum() == written, mode
        assert rows[rows.kind == "sums"].dram_reads_ifmap.sum() == 0
        if m.family == "resnet":
            reused += sum(1 for j in range(1, len(r.block_run))
                          if not r.block_run[j - 1] and m.blocks[j].lgate is not None)
    assert reused or m.family != "resnet"  # some gate read the sums of a skipped block's input


def test_replay_refuses_a_table_without_the_skip_rows(exit_case):
    """A table from before the `.sums` / `.skip_copy` rows (pooled sums charged to the gates that read
    them, no copy) is refused by name, not silently replayed."""
    from ddi_hw.calibrate import counts_from_runs
    from ddi_hw.deploy.backends import run_image

    m, _, table, b, x = exit_case
    b = _random_gates(b, 4)
    results = [run_image(b, x[n].numpy(), ReferenceBackend()) for n in range(4)]
    assert any(0 in r.block_run for r in results)
    with pytest.raises(UserError, match="no `.sums` rows"):
        counts_from_runs(table[table.kind != "sums"], b, results)
    if m.family == "densenet":
        with pytest.raises(UserError, match="no skip-copy row"):
            counts_from_runs(table[table.kind != "copy"], b, results)
