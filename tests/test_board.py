"""The real PYNQ driver (ddi_hw.board) against a stand-in for the pynq objects it uses.

pynq itself cannot be imported here (pynq 4.0 needs pynqutils/pynqmetadata and a board; with
--no-deps it fails at import), so this file provides, plainly, a fake at the level of the three
things the driver touches: `Overlay` (ip_dict + IP attributes), an IP's `write/read` (MMIO of
the AXI-Lite registers, every access recorded) and `allocate` (contiguous buffers with a
`device_address`, `flush`, `invalidate`). The fake engine decodes its registers on ap_start,
independently of the driver, using the register map file, runs the numpy fixed-point reference
on the bytes at those addresses, writes the output back and raises ap_done after a few polls.
"""
import types
from importlib import resources

import numpy as np
import pytest
import yaml

from ddi_hw.backends import ReferenceBackend, run_image
from ddi_hw.board import GPIO_DATA, GPIO_TRI, BoardBackend, BoardTimeout, measure
from ddi_hw.csim import expected_iterations, standard_cases
from ddi_hw.errors import UserError
from ddi_hw.export import ALIGN, Bundle, BundleLayer
from ddi_hw.fixedpoint import LayerParams, conv_layer
from ddi_hw.power.windows import WindowRecorder

RAW = yaml.safe_load(resources.files("ddi_hw").joinpath("regmap.yaml").read_text())
REG = {r["name"]: r for r in RAW["registers"]}
AP_CTRL = RAW["control"]["AP_CTRL"]["offset"]
BITS = RAW["control"]["AP_CTRL"]["bits"]
FLAGS = RAW["flags"]


class FakeBuffer(np.ndarray):
    device_address = 0
    flushes = invalidates = 0

    def flush(self):
        self.flushes += 1

    def invalidate(self):
        self.invalidates += 1

    def freebuffer(self):
        pass


class FakePynq:
    """Physical memory (a bump allocator of FakeBuffers) + Overlay factory."""

    def __init__(self, delay_polls=3, hang=False):
        self.next_addr, self.buffers = 0x1F000000, []
        self.delay_polls, self.hang = delay_polls, hang
        self.overlays = []

    def allocate(self, shape, dtype, cacheable=False, **kw):
        b = np.zeros(shape, dtype=dtype).view(FakeBuffer)
        b.device_address = self.next_addr
        self.next_addr += -(-b.nbytes // 4096) * 4096
        self.buffers.append(b)
        return b

    def mem(self, addr: int, n: int, dtype) -> np.ndarray:
        """A view of n items of dtype at physical address addr (must lie inside one buffer)."""
        dt = np.dtype(dtype)
        for b in self.buffers:
            lo = b.device_address
            if lo <= addr and addr + n * dt.itemsize <= lo + b.nbytes:
                return b.view(np.uint8)[addr - lo: addr - lo + n * dt.itemsize].view(dt)
        raise AssertionError(f"engine accessed unmapped memory at {addr:#x}")

    def Overlay(self, bitfile, download=True):
        ov = types.SimpleNamespace(ip_dict={"axi_gpio_0": {}, "ddi_engine_0": {}},
                                   ddi_engine_0=FakeEngine(self), axi_gpio_0=FakeGpio())
        self.overlays.append(ov)
        return ov


class FakeGpio:
    def __init__(self):
        self.log = []

    def write(self, offset, value):
        self.log.append((offset, value))


class FakeEngine:
    def __init__(self, pynq):
        self.pynq, self.regs, self.log = pynq, {}, []
        self.polls_left = None
        self.runs = 0

    def write(self, offset, value):
        assert 0 <= value < 1 << 32
        self.log.append(("w", offset, value))
        self.regs[offset] = value
        if offset == AP_CTRL and value & (1 << BITS["ap_start"]):
            self.polls_left = self.delay()
            if not self.pynq.hang:
                self._run()

    def delay(self):
        return self.pynq.delay_polls

    def read(self, offset):
        self.log.append(("r", offset))
        if offset == AP_CTRL:
            if self.pynq.hang or self.polls_left is None:
                return 1 << BITS["ap_start"]
            if self.polls_left > 0:
                self.polls_left -= 1
                return 1 << BITS["ap_start"]
            return (1 << BITS["ap_done"]) | (1 << BITS["ap_idle"])
        return self.regs.get(offset, 0)

    def _run(self):
        r = lambda name: self.regs[REG[name]["offset"]]
        flags = r("flags")
        k = 3 if flags >> FLAGS["FLAG_KERNEL3"] & 1 else 1
        p = LayerParams(kernel=k, stride=2 if flags >> FLAGS["FLAG_STRIDE2"] & 1 else 1,
                        relu=bool(flags >> FLAGS["FLAG_RELU"] & 1),
                        residual=bool(flags >> FLAGS["FLAG_RESIDUAL"] & 1),
                        acc_shift=r("acc_shift"), res_shift=r("res_shift"),
                        pre_affine=bool(flags >> FLAGS["FLAG_PRE_AFFINE"] & 1), pre_shift=r("pre_shift"))
        c, o, h, w, oh, ow = (r(n) for n in ("in_ch", "out_ch", "in_h", "in_w", "out_h", "out_w"))
        m = self.pynq.mem
        x = m(r("input"), c * h * w, "<i2").reshape(c, h, w)
        wt = m(r("weights"), o * c * k * k, "<i2").reshape(o, c, k, k)
        bias = m(r("bias"), o, "<i4")
        res = m(r("residual"), o * oh * ow, "<i2").reshape(o, oh, ow) if p.residual else None
        pre = m(r("pre"), c * 2, "<i4").reshape(c, 2) if p.pre_affine else None

        def mask(name, n):
            words = [self.regs[REG[name]["offset"] + 4 * i] for i in range(REG[name]["words"])]
            return np.array([(words[i // 32] >> (i % 32)) & 1 for i in range(n)], dtype=np.uint8)

        om, im = mask("out_mask", o), mask("in_mask", c)
        m(r("output"), o * oh * ow, "<i2")[:] = conv_layer(x, wt, bias, p, res, pre, om, im).reshape(-1)
        self.regs[REG["iterations"]["offset"]] = expected_iterations(int(im.sum()), int(om.sum()), oh, ow, k)
        self.runs += 1


@pytest.fixture
def bitfile(tmp_path):
    f = tmp_path / "ddi_engine.bit"
    f.write_bytes(b"not a real bitstream: the fake Overlay never reads it")
    return f


def _bundle_from_cases(cases):
    """A Bundle holding the csim test layers, packed like engine.bin (64-byte aligned)."""
    blob, layers = bytearray(), []
    for i, case in enumerate(cases):
        offsets = {}
        for key, arr in (("weights", case.w.astype("<i2")), ("bias", case.bias.astype("<i4")),
                         ("pre", None if case.pre is None else case.pre.astype("<i4"))):
            if arr is None:
                continue
            blob += b"\0" * (-len(blob) % ALIGN)
            offsets[key] = len(blob)
            blob += arr.tobytes()
        layers.append(BundleLayer(name=case.name, index=i, params=case.params, in_ch=case.x.shape[0],
                                  out_ch=case.w.shape[0], f_in=0, f_w=0, f_out=0, f_res=None,
                                  weights=case.w, bias=case.bias, pre=case.pre, offsets=offsets))
    return Bundle(path=None, manifest={"program": []}, layers=layers, engine_blob=bytes(blob), processor={})


def test_exact_register_sequence_of_one_launch(bitfile):
    fake = FakePynq(delay_polls=3)
    case = standard_cases()[1]  # 3x3 s1 residual with an output-channel mask
    bundle = _bundle_from_cases([case])
    be = BoardBackend(bitfile, pynq=fake)
    be.prepare(bundle)
    eng = fake.overlays[0].ddi_engine_0
    eng.log.clear()
    run = be.run_layer(bundle.layers[0], case.x, case.residual, case.out_mask, case.in_mask)

    c, h, w = case.x.shape
    o = case.w.shape[0]
    base = be.bufs["blob"].device_address
    expect = {"input": be.bufs["in"].device_address, "weights": base + bundle.layers[0].offsets["weights"],
              "bias": base + bundle.layers[0].offsets["bias"], "output": be.bufs["out"].device_address,
              "residual": be.bufs["res"].device_address, "pre": 0, "in_ch": c, "out_ch": o, "in_h": h,
              "in_w": w, "out_h": h, "out_w": w,
              "flags": (1 << FLAGS["FLAG_KERNEL3"]) | (1 << FLAGS["FLAG_RELU"]) | (1 << FLAGS["FLAG_RESIDUAL"]),
              "acc_shift": case.params.acc_shift, "res_shift": case.params.res_shift, "pre_shift": 0}
    seq = []
    for reg in RAW["registers"]:
        if reg["access"] != "w":
            continue
        if reg.get("words", 1) > 1:
            m = case.out_mask if reg["name"] == "out_mask" else np.ones(c)
            words = [sum(int(m[i * 32 + b]) << b for b in range(32) if i * 32 + b < len(m))
                     for i in range(reg["words"])]
            seq += [("w", reg["offset"] + 4 * i, v) for i, v in enumerate(words)]
        else:
            seq.append(("w", reg["offset"], expect[reg["name"]]))
    seq.append(("w", AP_CTRL, 1))
    seq += [("r", AP_CTRL)] * 4  # three polls busy, the fourth sees ap_done
    seq.append(("r", REG["iterations"]["offset"]))
    assert eng.log == seq
    assert np.array_equal(run.output, case.expected)
    assert be.bufs["in"].flushes == 1 and be.bufs["out"].invalidates == 1


def test_every_csim_case_matches_the_reference_bit_for_bit(bitfile):
    fake = FakePynq(delay_polls=1)
    cases = standard_cases(seed=3)
    bundle = _bundle_from_cases(cases)
    be = BoardBackend(bitfile, pynq=fake)
    be.prepare(bundle)
    for layer, case in zip(bundle.layers, cases):
        run = be.run_layer(layer, case.x, case.residual, case.out_mask, case.in_mask)
        assert np.array_equal(run.output, case.expected), case.name
        n_in = case.x.shape[0] if case.in_mask is None else int(case.in_mask.sum())
        n_out = case.w.shape[0] if case.out_mask is None else int(case.out_mask.sum())
        assert run.iterations == expected_iterations(n_in, n_out, *case.expected.shape[1:], case.params.kernel)
    assert fake.overlays[0].ddi_engine_0.runs == len(cases) == be.launches


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from ddi_hw.export import export_model, load_bundle
    from ddi_hw.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet14", layer_gates=True, channel_gates=True, exits=True)
    images = torch.randn(6, 3, 32, 32)
    out = tmp_path_factory.mktemp("bundle")
    export_model(model, out, images[:4])
    bundle = load_bundle(out)
    # random gate biases so that some blocks are skipped and channels masked (untrained gates
    # would run everything, which would not test the dynamic path)
    rng = np.random.default_rng(0)
    for k in bundle.processor:
        if k.endswith("fc.bias") and ".cgate." in k:
            bundle.processor[k] = rng.normal(0, 1.0, bundle.processor[k].shape).astype(np.float32)
    w = bundle.processor["layer_gate.proj.weight"]
    bundle.processor["layer_gate.proj.weight"] = rng.normal(0, 3, w.shape).astype(np.float32)
    bundle.processor["layer_gate.proj.bias"] = np.zeros(1, np.float32)
    return bundle, images.numpy()


def test_whole_dynamic_inference_matches_reference(bitfile, tiny_bundle):
    bundle, images = tiny_bundle
    fake = FakePynq(delay_polls=2)
    be = BoardBackend(bitfile, pynq=fake)
    skipped = masked = 0
    for img in images:
        ref = run_image(bundle, img, ReferenceBackend())
        got = be.infer(bundle, img)
        assert np.array_equal(got.logits, ref.logits)
        assert got.block_run == ref.block_run and got.launches == ref.launches
        assert got.iterations == ref.iterations
        assert set(got.channel_masks) == set(ref.channel_masks)
        for g in ref.channel_masks:
            assert np.array_equal(got.channel_masks[g], ref.channel_masks[g])
        skipped += ref.block_run.count(0)
        masked += sum(int((m == 0).sum()) for m in ref.channel_masks.values())
    assert skipped > 0 and masked > 0  # the dynamic path was really exercised
    # an early exit through the engine too
    ref = run_image(bundle, images[0], ReferenceBackend(), exit_at=0)
    got = be.infer(bundle, images[0], exit_at=0)
    assert got.exit_taken == 0 and np.array_equal(got.logits, ref.logits)


def test_measure_marks_windows_with_gpio_and_timestamps(bitfile, tiny_bundle, tmp_path):
    import pandas as pd

    bundle, images = tiny_bundle
    fake = FakePynq(delay_polls=0)
    be = BoardBackend(bitfile, pynq=fake)
    rec = WindowRecorder(tmp_path / "windows.csv", marker=be.marker)
    res = measure(bundle, images[:2], be, rec, "iadi50", repeats=2, idle_s=0.01, progress=False)
    assert len(res) == 4
    gpio = fake.overlays[0].axi_gpio_0.log
    assert gpio == [(GPIO_TRI, 0), (GPIO_DATA, 0), (GPIO_DATA, 1), (GPIO_DATA, 0), (GPIO_DATA, 1), (GPIO_DATA, 0)]
    w = pd.read_csv(tmp_path / "windows.csv")
    assert list(w.kind) == ["idle", "run", "run", "idle"]
    assert list(w.n_inferences[w.kind == "run"]) == [2, 2]
    assert (w.end_mono_s >= w.start_mono_s).all() and (w.start_mono_s.diff().dropna() > 0).all()


def test_hung_engine_times_out(bitfile):
    fake = FakePynq(hang=True)
    case = standard_cases()[0]
    bundle = _bundle_from_cases([case])
    be = BoardBackend(bitfile, pynq=fake, timeout_s=0.05)
    be.prepare(bundle)
    with pytest.raises(BoardTimeout, match="did not finish"):
        be.run_layer(bundle.layers[0], case.x, case.residual)


def test_without_pynq_or_overlay_one_line_errors(bitfile, tmp_path):
    with pytest.raises(UserError, match="needs pynq"):
        BoardBackend(bitfile)  # no pynq in this environment
    with pytest.raises(UserError, match="not found"):
        BoardBackend(tmp_path / "missing.bit", pynq=FakePynq())


def test_counts_from_runs_follow_the_real_engine_launches(tiny_bundle):
    """Calibration counts replayed from decisions == counts of the launches the engine really got."""
    import pandas as pd

    from ddi_hw.calibrate import counts_from_runs

    bundle, images = tiny_bundle
    launches = []

    class Recording(ReferenceBackend):
        def run_layer(self, layer, x, residual=None, out_mask=None, in_mask=None):
            if out_mask is not None:
                launches.append((layer.index, "out", int(out_mask.sum())))
            elif in_mask is not None:
                launches.append((layer.index, "in", int(in_mask.sum())))
            else:
                launches.append((layer.index, "out", layer.out_ch))
            return super().run_layer(layer, x, residual, out_mask, in_mask)

    results = [run_image(bundle, img, Recording()) for img in images[:3]]
    results.append(run_image(bundle, images[3], Recording(), exit_at=0))
    # a synthetic cost table with a distinct, known value per (layer, axis, active)
    rows = []
    for layer in bundle.layers:
        for axis, n in (("out", layer.out_ch), ("in", layer.in_ch)):
            for k in range(n + 1):
                v = 1000 * layer.index + 10 * k + (1 if axis == "in" else 0)
                rows.append({"layer": layer.name, "axis": axis, "active": k, "macs": v, "cycles": 2 * v,
                             "rf_accesses": 3 * v, "noc_accesses": 2 * v, "sram_reads_ifmap": v,
                             "sram_reads_filter": 0, "sram_writes_ofmap": 0, "dram_reads_ifmap": 0,
                             "dram_reads_filter": v, "dram_writes_ofmap": 0})
    counts = counts_from_runs(pd.DataFrame(rows), bundle, results)
    expect = sum(1000 * i + 10 * k + (1 if axis == "in" else 0) for i, axis, k in launches) / len(results)
    assert counts["macs"] == pytest.approx(expect) and counts["cycles"] == pytest.approx(2 * expect)
    assert counts["dram_accesses"] == pytest.approx(expect) and counts["rf_accesses"] == pytest.approx(3 * expect)
    assert len(launches) < 4 * len(bundle.layers)  # skipped blocks and the exit launched less
