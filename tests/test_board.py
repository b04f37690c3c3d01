"""The real PYNQ driver (ddi_hw.deploy.board) on the real pynq package, with only the Device replaced.

pynq (3.1.x, the release of the Zynq-7000 PYNQ images; installed --no-deps, see .ci/run) runs
unmodified: `pynq.Overlay` parses an .hwh with pynqmetadata, downloads through the Device and
programs FCLK0 from the hwh through the SLCR; IP drivers (`DefaultIP`, pynq.lib's `AxiGPIO`)
access registers through `pynq.MMIO`; `pynq.allocate` returns `PynqBuffer`s whose flush and
invalidate go to the Device (under numpy 2 through a one-attribute subclass, see `_Buffer`).
What is replaced is what a board provides:
`ZedBoardTestDevice(pynq.Device)` maps anonymous memory where /dev/mem would be (every register
read and write is recorded) and hands out buffers from an anonymous "DDR" mmap with physical
addresses. Its `EngineModel` plays the ddi_engine: on ap_start it decodes the registers from the
register memory using ddi_hw/deploy/regmap.yaml (independently of the driver), runs the numpy
fixed-point reference on the DDR bytes at those addresses, writes the output back, and raises
ap_done after a few polls. The overlay files are generated here: an .hwh with the block
design's names and Vivado's default addresses (fpga/vivado/overlay.tcl) and a .bit with a
valid header (pynq's own parse_bit_header reads it).
"""
import mmap
import struct
import sys
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml

try:
    with warnings.catch_warnings():  # pynq 3.1's pkg_resources, pynqmetadata's pydantic-v1 style
        warnings.simplefilter("ignore")
        import pynq
        from pynq.buffer import PynqBuffer
        from pynq.pl_server import embedded_device
except ImportError as err:  # CI installs it; a clear reason instead of a bare collection error
    raise ImportError("tests/test_board.py runs the real pynq: pip install --no-deps pynq==3.1.2 "
                      "pynqutils==0.1.3 pynqmetadata==0.1.9 (see .ci/run)") from err

from ddi_hw.deploy.backends import ReferenceBackend, run_image
from ddi_hw.deploy.board import GPIO_DATA, GPIO_TRI, BoardBackend, BoardTimeout, measure
from ddi_hw.deploy.bundle import ALIGN, Bundle, BundleLayer
from ddi_hw.deploy.csim import expected_iterations, standard_cases
from ddi_hw.deploy.fixedpoint import LayerParams, conv_layer
from ddi_hw.errors import UserError
from ddi_hw.power.windows import WindowRecorder

RAW = yaml.safe_load(resources.files("ddi_hw.deploy").joinpath("regmap.yaml").read_text())
REG = {r["name"]: r for r in RAW["registers"]}
AP_CTRL = RAW["control"]["AP_CTRL"]["offset"]
BITS = RAW["control"]["AP_CTRL"]["bits"]
FLAGS = RAW["flags"]
START, DONE_IDLE = 1 << BITS["ap_start"], (1 << BITS["ap_done"]) | (1 << BITS["ap_idle"])

# Vivado's assign_bd_address defaults on the Zynq-7000 M_AXI_GP0 window (HLS IP, AXI GPIO)
ENGINE_BASE, GPIO_BASE, IP_RANGE = 0x43C00000, 0x41200000, 0x10000
SLCR_BASE, IO_PLL_CTRL, FPGA0_CLK_CTRL = 0xF8000000, 0x108, 0x170
DDR_BASE, DDR_SIZE = 0x10000000, 16 << 20  # where the PYNQ image's CMA buffers live


def _hwh() -> str:
    """The hardware handoff of fpga/vivado/overlay.tcl's block design, cut to what pynq reads:
    the PS7 with FCLK0 = 100 MHz (IO PLL / 5 / 2), ddi_engine_0 and marker_gpio on M_AXI_GP0."""
    def p(name, value):
        return f'<PARAMETER NAME="{name}" VALUE="{value}"/>'

    clocks = "".join(p(f"PCW_FPGA_FCLK{i}_ENABLE", int(i == 0)) + p(f"PCW_FCLK{i}_PERIPHERAL_CLKSRC", "IO PLL")
                     + p(f"PCW_FCLK{i}_PERIPHERAL_DIVISOR0", 5 if i == 0 else 1)
                     + p(f"PCW_FCLK{i}_PERIPHERAL_DIVISOR1", 2 if i == 0 else 1) for i in range(4))

    def memrange(inst, itf, base):
        return (f'<MEMRANGE ADDRESSBLOCK="Reg" BASENAME="C_BASEADDR" BASEVALUE="0x{base:08X}" HIGHNAME="C_HIGHADDR" '
                f'HIGHVALUE="0x{base + IP_RANGE - 1:08X}" INSTANCE="{inst}" IS_DATA="TRUE" IS_INSTRUCTION="TRUE" '
                f'MASTERBUSINTERFACE="M_AXI_GP0" MEMTYPE="REGISTER" SLAVEBUSINTERFACE="{itf}"/>')

    def module(inst, vlnv, modtype, params, slave):
        return (f'<MODULE FULLNAME="/{inst}" INSTANCE="{inst}" IPTYPE="PERIPHERAL" IS_ENABLE="1" IS_PL="TRUE" '
                f'MODCLASS="PERIPHERAL" MODTYPE="{modtype}" VLNV="{vlnv}"><PARAMETERS>{params}</PARAMETERS><PORTS/>'
                f'<BUSINTERFACES><BUSINTERFACE NAME="{slave}" TYPE="SLAVE" VLNV="xilinx.com:interface:aximm:1.0"/>'
                f'</BUSINTERFACES></MODULE>')

    gpio_params = "".join(p(k, v) for k, v in (("C_GPIO_WIDTH", 1), ("C_ALL_OUTPUTS", 1), ("C_IS_DUAL", 0),
                                                ("C_INTERRUPT_PRESENT", 0)))
    return f'''<?xml version="1.0" encoding="UTF-8" standalone="no" ?>
<EDKSYSTEM EDWVERSION="1.2" VIVADOVERSION="2022.2">
  <SYSTEMINFO ARCH="zynq" BOARD="avnet.com:zedboard:part0:1.4" DEVICE="7z020" NAME="ddi_overlay" PACKAGE="clg484" SPEEDGRADE="-1"/>
  <EXTERNALPORTS/>
  <EXTERNALINTERFACES/>
  <MODULES>
    <MODULE FULLNAME="/ps7" INSTANCE="ps7" IPTYPE="PERIPHERAL" IS_ENABLE="1" IS_PL="FALSE" MODCLASS="PROCESSOR" MODTYPE="processing_system7" VLNV="xilinx.com:ip:processing_system7:5.5">
      <PARAMETERS>{clocks}</PARAMETERS>
      <MEMORYMAP>{memrange(f"{RAW['top']}_0", "s_axi_control", ENGINE_BASE)}{memrange("marker_gpio", "S_AXI", GPIO_BASE)}</MEMORYMAP>
      <PORTS/>
      <BUSINTERFACES><BUSINTERFACE NAME="M_AXI_GP0" TYPE="MASTER" VLNV="xilinx.com:interface:aximm:1.0"/></BUSINTERFACES>
    </MODULE>
    {module(f"{RAW['top']}_0", f"ddi-hw:hls:{RAW['top']}:1.0", RAW['top'], "", "s_axi_control")}
    {module("marker_gpio", "xilinx.com:ip:axi_gpio:2.0", "axi_gpio", gpio_params, "S_AXI")}
  </MODULES>
</EDKSYSTEM>
'''


def _bit(design: str, part: str, payload: bytes = b"\xff" * 64) -> bytes:
    """A .bit file: Xilinx header (design, part, date, time) + a configuration payload."""
    def field(tag, text):
        raw = text.encode() + b"\0"
        return tag + struct.pack(">h", len(raw)) + raw

    return (struct.pack(">h", 9) + bytes(9) + struct.pack(">h", 1)
            + field(b"a", f"{design};UserID=0XFFFFFFFF;Version=2022.2") + field(b"b", part)
            + field(b"c", "2026/11/24") + field(b"d", "07:00:00")
            + b"e" + struct.pack(">i", len(payload)) + payload)


if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
    class _Buffer(PynqBuffer):
        """numpy 2 made `ndarray.device` a read-only property and PynqBuffer.__new__ assigns
        `self.device` (why pynq pins numpy<2); a plain class attribute lets pynq's own buffer
        class run here unchanged. The board's PYNQ image has numpy 1.x and the plain class."""
        device = None
else:
    _Buffer = PynqBuffer


class _Registers(np.ndarray):
    """What `Device.mmap` returns: a uint32 view of a page whose element reads and writes are
    recorded with their physical address (MMIO, pynq's Register and RegisterMap all index it)."""

    def __array_finalize__(self, obj):
        self._dev, self._page = getattr(obj, "_dev", None), getattr(obj, "_page", None)

    def _addr(self, i: int) -> int:
        page_addr, page_ptr = self._page
        return page_addr + self.__array_interface__["data"][0] - page_ptr + i * self.itemsize

    def __getitem__(self, key):
        if not isinstance(key, (int, np.integer)):
            return np.ndarray.__getitem__(self, key)
        addr = self._addr(int(key))
        self._dev.before_read(addr)
        value = np.ndarray.__getitem__(self, key)
        self._dev.log.append(("r", addr, int(value)))
        return value

    def __setitem__(self, key, value):
        np.ndarray.__setitem__(self, key, value)
        if isinstance(key, (int, np.integer)):
            addr = self._addr(int(key))
            self._dev.log.append(("w", addr, int(np.ndarray.__getitem__(self, key))))
            self._dev.after_write(addr)


class _Bo:
    """The device's buffer-object handle (XRT's role on the board)."""

    def __init__(self, address: int, size: int):
        self.address, self.size = address, size


class _DDR:
    """`Device.default_memory`: pynq's Device.allocate calls `.allocate(shape, dtype, **kw)`."""

    def __init__(self, device):
        self.device = device

    def allocate(self, shape, dtype, cacheable=False, **kwargs):
        return self.device.allocate_bo(shape, dtype)


class ZedBoardTestDevice(pynq.Device):
    """A Zynq-7000 as pynq sees it (arch armv7l, memory-mapped registers), backed by memory."""

    def __init__(self, delay_polls: int = 3, hang: bool = False):
        super().__init__("zedboard_test")
        self.name = "zedboard_test"
        self.capabilities = {"MEMORY_MAPPED": True}
        self.arch = "armv7l"
        self.log: list[tuple] = []
        self.pages: dict[int, mmap.mmap] = {}
        self.ddr, self.ddr_used = mmap.mmap(-1, DDR_SIZE), 0
        self.default_memory = _DDR(self)
        self.engine = EngineModel(self, ENGINE_BASE, delay_polls, hang)
        # ZedBoard SLCR after boot: IO PLL feedback divider 30 (pynq's Clocks reads it)
        self.raw(SLCR_BASE + IO_PLL_CTRL, 1)[0] = 30 << 12

    # --- registers: Device.mmap is what pynq.MMIO calls on a MEMORY_MAPPED device ------------
    def raw(self, addr: int, n_words: int) -> np.ndarray:
        """Unrecorded uint32 view of the register memory (for the engine and the setup)."""
        page = addr & ~(IP_RANGE - 1)
        assert addr + 4 * n_words <= page + IP_RANGE, f"{addr:#x}+{4 * n_words} crosses a page"
        mem = self.pages.setdefault(page, mmap.mmap(-1, IP_RANGE))
        return np.frombuffer(mem, np.uint32)[(addr - page) // 4:(addr - page) // 4 + n_words]

    def mmap(self, base_addr, length):
        view = self.raw(base_addr, length >> 2).view(_Registers)
        page = base_addr & ~(IP_RANGE - 1)
        view._dev, view._page = self, (page, np.frombuffer(self.pages[page], np.uint8).ctypes.data)
        return view

    def before_read(self, addr):
        self.engine.before_read(addr)

    def after_write(self, addr):
        self.engine.after_write(addr)

    # --- memory: pynq.allocate -> Device.allocate -> default_memory.allocate -------------------
    def allocate_bo(self, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        off = self.ddr_used
        self.ddr_used += -(-max(n, 1) // 4096) * 4096
        assert self.ddr_used <= DDR_SIZE, "test DDR exhausted"
        bo = _Bo(DDR_BASE + off, n)
        return _Buffer(shape, dtype, bo=bo, device=self, buffer=memoryview(self.ddr)[off:off + n],
                       device_address=bo.address, coherent=False)

    def flush(self, bo, offset, ptr, size):
        self.log.append(("flush", bo.address + offset, size))

    def invalidate(self, bo, offset, ptr, size):
        self.log.append(("invalidate", bo.address + offset, size))

    def phys(self, addr: int, n: int, dtype) -> np.ndarray:
        """n items of dtype at a physical DDR address, which must lie in allocated memory."""
        nbytes = n * np.dtype(dtype).itemsize
        assert DDR_BASE <= addr and addr + nbytes <= DDR_BASE + self.ddr_used, \
            f"engine accessed unallocated memory at {addr:#x}"
        return np.frombuffer(self.ddr, np.dtype(dtype), count=n, offset=addr - DDR_BASE)

    # --- bitstreams: what EmbeddedDevice does, minus XRT and the FPGA manager -----------------
    def get_bitfile_metadata(self, bitfile_name, partial=False):
        hwh = Path(bitfile_name).with_suffix(".hwh")
        return embedded_device.RuntimeMetadataParser(embedded_device.Metadata(input=str(hwh)))

    def download(self, bitstream, parser=None):
        header = embedded_device.parse_bit_header(Path(bitstream.bitfile_name).read_bytes())
        self.log.append(("download", header["design"], header["part"]))
        self.post_download(bitstream, parser)


class EngineModel:
    """The ddi_engine behind the AXI-Lite page at `base` (decoding independent of the driver)."""

    def __init__(self, device: ZedBoardTestDevice, base: int, delay_polls: int, hang: bool):
        self.dev, self.base, self.delay_polls, self.hang = device, base, delay_polls, hang
        self.polls_left = None
        self.runs = 0

    def after_write(self, addr):
        if addr == self.base + AP_CTRL and self.dev.raw(addr, 1)[0] & START and not self.hang:
            self._run()
            self.polls_left = self.delay_polls

    def before_read(self, addr):
        if addr != self.base + AP_CTRL:
            return
        ctrl = self.dev.raw(addr, 1)
        if self.hang or self.polls_left is None:
            ctrl[0] = START
        elif self.polls_left > 0:
            self.polls_left -= 1
            ctrl[0] = START
        else:
            ctrl[0] = DONE_IDLE

    def _run(self):
        regs = self.dev.raw(self.base, IP_RANGE // 4)

        def r(name):
            return int(regs[REG[name]["offset"] // 4])

        flags = r("flags")
        k = 3 if flags >> FLAGS["FLAG_KERNEL3"] & 1 else 1
        p = LayerParams(kernel=k, stride=2 if flags >> FLAGS["FLAG_STRIDE2"] & 1 else 1,
                        relu=bool(flags >> FLAGS["FLAG_RELU"] & 1),
                        residual=bool(flags >> FLAGS["FLAG_RESIDUAL"] & 1),
                        acc_shift=r("acc_shift"), res_shift=r("res_shift"),
                        pre_affine=bool(flags >> FLAGS["FLAG_PRE_AFFINE"] & 1), pre_shift=r("pre_shift"),
                        pool=bool(flags >> FLAGS["FLAG_POOL"] & 1),
                        store=not flags >> FLAGS["FLAG_NO_STORE"] & 1)
        c, o, h, w, oh, ow = (r(n) for n in ("in_ch", "out_ch", "in_h", "in_w", "out_h", "out_w"))
        m = self.dev.phys
        x = m(r("input"), c * h * w, "<i2").reshape(c, h, w)
        wt = m(r("weights"), o * c * k * k, "<i2").reshape(o, c, k, k)
        bias = m(r("bias"), o, "<i4")
        res = m(r("residual"), o * oh * ow, "<i2").reshape(o, oh, ow) if p.residual else None
        pre = m(r("pre"), c * 2, "<i4").reshape(c, 2) if p.pre_affine else None

        def mask(name, n):
            words = [int(regs[REG[name]["offset"] // 4 + i]) for i in range(REG[name]["words"])]
            return np.array([(words[i // 32] >> (i % 32)) & 1 for i in range(n)], dtype=np.uint8)

        om, im = mask("out_mask", o), mask("in_mask", c)
        y = conv_layer(x, wt, bias, p, res, pre, om, im)
        n_map = o * oh * ow if p.store else 0
        if p.store:
            m(r("output"), n_map, "<i2")[:] = y.reshape(-1)
        if p.pool:  # FLAG_POOL: int32 channel sums right after the ofmap
            m(r("output") + 2 * n_map, o, "<i4")[:] = y.astype(np.int64).sum(axis=(1, 2))
        regs[REG["iterations"]["offset"] // 4] = expected_iterations(int(im.sum()), int(om.sum()), oh, ow, k)
        self.runs += 1


@pytest.fixture
def board(tmp_path):
    """Overlay files on disk and a ZedBoardTestDevice as pynq's active device. Returns a
    factory so a test can choose the engine's behaviour."""
    bit = tmp_path / "ddi_engine.bit"
    bit.write_bytes(_bit("ddi_overlay_wrapper", "7z020clg484"))
    bit.with_suffix(".hwh").write_text(_hwh())
    def make(**engine):
        dev = ZedBoardTestDevice(**engine)
        pynq.Device.active_device = dev
        # pynq.Clocks caches its SLCR driver for the first device it saw; each test has its own
        if hasattr(pynq.Clocks, "_real_instance"):
            del pynq.Clocks._real_instance
        return dev

    yield bit, make
    if hasattr(pynq.Device, "_active_device"):
        del pynq.Device._active_device


def _engine_log(dev, since=0):
    """The engine's register accesses (as offsets) and the buffer syncs, in order."""
    out = []
    for entry in dev.log[since:]:
        if entry[0] in ("flush", "invalidate"):
            out.append(entry)
        elif entry[0] in ("r", "w") and ENGINE_BASE <= entry[1] < ENGINE_BASE + IP_RANGE:
            out.append((entry[0], entry[1] - ENGINE_BASE, entry[2]))
    return out


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


def test_overlay_is_loaded_by_pynq_from_the_hwh(board):
    bit, make = board
    dev = make()
    be = BoardBackend(bit)
    assert ("download", "ddi_overlay_wrapper", "7z020clg484") in dev.log
    assert isinstance(be.overlay, pynq.Overlay) and be.overlay.is_loaded()
    assert isinstance(be.ip, pynq.DefaultIP) and be.ip.mmio.base_addr == ENGINE_BASE
    assert type(be.gpio).__name__ == "AxiGPIO" and be.gpio.mmio.base_addr == GPIO_BASE
    # pynq programmed FCLK0 from the hwh's divisors (IO PLL / 5 / 2) through the SLCR
    clk = [v for op, a, v in dev.log if op == "w" and a == SLCR_BASE + FPGA0_CLK_CTRL][-1]
    assert (clk >> 8 & 0x3F, clk >> 20 & 0x3F) == (5, 2)
    # the marker pin was made an output and driven low, nothing else touched the GPIO
    assert [e for e in dev.log if e[0] == "w" and GPIO_BASE <= e[1] < GPIO_BASE + IP_RANGE] == \
        [("w", GPIO_BASE + GPIO_TRI, 0), ("w", GPIO_BASE + GPIO_DATA, 0)]


def test_engine_driver_is_bound_by_vlnv_whatever_the_instance_name(board, tmp_path):
    """pynq picks the DdiEngine driver from the .hwh's VLNV (bindto), not from the instance name; the
    Vivado scripts export and instantiate the IP under that VLNV."""
    from pathlib import Path

    from ddi_hw.deploy.board import ENGINE_VLNV

    bit, make = board
    make()
    inst = f"{RAW['top']}_0"
    renamed = tmp_path / "renamed.bit"
    renamed.write_bytes(bit.read_bytes())
    renamed.with_suffix(".hwh").write_text(bit.with_suffix(".hwh").read_text().replace(inst, "conv_accel"))
    be = BoardBackend(renamed)
    assert type(be.ip).__name__ == "DdiEngine" and be.ip.mmio.base_addr == ENGINE_BASE
    assert be.overlay.ip_dict["conv_accel"]["type"] == ENGINE_VLNV
    vendor, library, name, version = ENGINE_VLNV.split(":")
    vivado = Path(__file__).resolve().parents[1] / "fpga" / "vivado"
    hls = (vivado / "hls.tcl").read_text()
    assert all(f"-{k} {v}" in hls for k, v in (("vendor", vendor), ("library", library), ("version", version)))
    assert name == RAW["top"]
    assert f"-vlnv {ENGINE_VLNV} " in (vivado / "overlay.tcl").read_text()


def test_exact_register_sequence_of_one_launch(board):
    bit, make = board
    dev = make(delay_polls=3)
    case = standard_cases()[1]  # 3x3 s1 residual with an output-channel mask
    bundle = _bundle_from_cases([case])
    be = BoardBackend(bit)
    be.prepare(bundle)
    assert isinstance(be.bufs["blob"], PynqBuffer)
    since = len(dev.log)
    run = be.run_layer(bundle.layers[0], case.x, case.residual, case.out_mask, case.in_mask)

    c, h, w = case.x.shape
    o = case.w.shape[0]
    addr = {k: b.device_address for k, b in be.bufs.items()}
    assert len(set(addr.values())) == 4 and all(DDR_BASE <= a < DDR_BASE + DDR_SIZE for a in addr.values())
    lay = bundle.layers[0]
    expect = {"input": addr["in"], "weights": addr["blob"] + lay.offsets["weights"],
              "bias": addr["blob"] + lay.offsets["bias"], "output": addr["out"],
              "residual": addr["res"], "pre": 0, "in_ch": c, "out_ch": o, "in_h": h,
              "in_w": w, "out_h": h, "out_w": w,
              "flags": (1 << FLAGS["FLAG_KERNEL3"]) | (1 << FLAGS["FLAG_RELU"]) | (1 << FLAGS["FLAG_RESIDUAL"]),
              "acc_shift": case.params.acc_shift, "res_shift": case.params.res_shift, "pre_shift": 0}
    seq = [("flush", addr["in"], c * h * w * 2), ("flush", addr["res"], o * h * w * 2)]
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
    seq.append(("w", AP_CTRL, START))
    seq += [("r", AP_CTRL, START)] * 3 + [("r", AP_CTRL, DONE_IDLE)]  # three polls busy, then done
    seq.append(("invalidate", addr["out"], o * h * w * 2))
    n_in = c if case.in_mask is None else int(case.in_mask.sum())
    iters = expected_iterations(n_in, int(case.out_mask.sum()), h, w, case.params.kernel)
    seq.append(("r", REG["iterations"]["offset"], iters))
    assert _engine_log(dev, since) == seq
    assert np.array_equal(run.output, case.expected) and run.iterations == iters


def test_every_csim_case_matches_the_reference_bit_for_bit(board):
    bit, make = board
    dev = make(delay_polls=1)
    cases = standard_cases(seed=3)
    bundle = _bundle_from_cases(cases)
    be = BoardBackend(bit)
    be.prepare(bundle)
    for layer, case in zip(bundle.layers, cases):
        run = be.run_layer(layer, case.x, case.residual, case.out_mask, case.in_mask)
        assert np.array_equal(run.output, case.expected), case.name
        n_in = case.x.shape[0] if case.in_mask is None else int(case.in_mask.sum())
        n_out = case.w.shape[0] if case.out_mask is None else int(case.out_mask.sum())
        assert run.iterations == expected_iterations(n_in, n_out, *case.expected.shape[1:], case.params.kernel)
    assert dev.engine.runs == len(cases) == be.launches


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    import torch

    from ddi_hw.deploy.bundle import load_bundle
    from ddi_hw.export import export_model
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


def test_whole_dynamic_inference_matches_reference(board, tiny_bundle):
    bundle, images = tiny_bundle
    bit, make = board
    dev = make(delay_polls=2)
    be = BoardBackend(bit)
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
    assert dev.engine.runs == be.launches > 0
    # an early exit through the engine too
    ref = run_image(bundle, images[0], ReferenceBackend(), exit_at=0)
    got = be.infer(bundle, images[0], exit_at=0)
    assert got.exit_taken == 0 and np.array_equal(got.logits, ref.logits)


def test_measure_marks_windows_with_gpio_and_timestamps(board, tiny_bundle, tmp_path):
    import pandas as pd

    bundle, images = tiny_bundle
    bit, make = board
    dev = make(delay_polls=0)
    be = BoardBackend(bit)
    rec = WindowRecorder(tmp_path / "windows.csv", marker=be.marker)
    res = measure(bundle, images[:2], be, rec, "iadi50", repeats=2, idle_s=0.01, progress=False)
    assert len(res) == 4
    gpio = [(a - GPIO_BASE, v) for op, a, v in (e for e in dev.log if e[0] == "w")
            if GPIO_BASE <= a < GPIO_BASE + IP_RANGE]
    assert gpio == [(GPIO_TRI, 0), (GPIO_DATA, 0), (GPIO_DATA, 1), (GPIO_DATA, 0), (GPIO_DATA, 1), (GPIO_DATA, 0)]
    w = pd.read_csv(tmp_path / "windows.csv")
    assert list(w.kind) == ["idle", "run", "run", "idle"]
    assert list(w.n_inferences[w.kind == "run"]) == [2, 2]
    assert (w.end_mono_s >= w.start_mono_s).all() and (w.start_mono_s.diff().dropna() > 0).all()


def test_hung_engine_times_out(board):
    bit, make = board
    make(hang=True)
    case = standard_cases()[0]
    bundle = _bundle_from_cases([case])
    be = BoardBackend(bit, timeout_s=0.05)
    be.prepare(bundle)
    with pytest.raises(BoardTimeout, match="did not finish"):
        be.run_layer(bundle.layers[0], case.x, case.residual)


def test_without_pynq_or_overlay_one_line_errors(board, tmp_path, monkeypatch):
    bit, make = board
    make()
    with pytest.raises(UserError, match="not found"):
        BoardBackend(tmp_path / "missing.bit")
    del pynq.Device._active_device  # pynq installed, but no board: its probing found no device
    monkeypatch.setattr(pynq.Device, "_devices", [], raising=False)
    with pytest.raises(UserError, match="no FPGA device"):
        BoardBackend(bit)
    monkeypatch.setitem(sys.modules, "pynq", None)  # what `import pynq` sees without pynq
    with pytest.raises(UserError, match="needs pynq") as err:
        BoardBackend(bit)
    assert "\n" not in str(err.value)


def _exit_pool_table_rows(bundle, value, kernel=None):
    """Synthetic cost-table rows of every exit's max pool (one row per exit, one pass: `kernel` =
    the bundle's window unless given) at `value(in_shape)`, and of its global pool (fused into conv2:
    never a processor map op; zero here, its pooled words are counted with the exit's rows, which
    tests/test_dataflow.py checks on real tables)."""
    rows = []
    for st in bundle.program:
        if st["op"] != "exit" or st["pool"] == 1:
            continue
        c, h, w = bundle.manifest["tensors"][st["in"]]["shape"]
        k = kernel or st["pool"]
        v = value((c, h, w))  # the engine rows' pattern: macs v, cycles 2v, rf 3v, DRAM v
        counts = {"macs": v, "cycles": 2 * v, "rf_accesses": 3 * v, "noc_accesses": 2 * v, "sram_reads_ifmap": v,
                  "sram_reads_filter": 0, "sram_writes_ofmap": 0, "dram_reads_ifmap": v, "dram_reads_filter": 0,
                  "dram_writes_ofmap": 0}
        rows.append({**counts, "layer": f"{st['prefix']}.pool#0", "axis": "out", "active": c, "block": st["prefix"],
                     "kind": "pool", "in_ch": c, "out_h": -(-h // k), "out_w": -(-w // k), "kernel_h": k})
        rows.append({**rows[-1], **dict.fromkeys(counts, 0), "layer": f"{st['prefix']}.pool#1",
                     "out_h": 1, "out_w": 1, "kernel_h": 8})
    return rows


def _with_every_row(rows):
    """A synthetic table completed to the tiny bundle's model: every traced layer (gates' vector
    layers, pools, adds, FCs) gets its block / role / gate columns; layers `rows` does not price
    cost zero, so only the priced rows can show up in the counts."""
    import pandas as pd

    from ddi_hw.models import create_model
    from energy_models.scalesim_runner import COUNT_COLUMNS

    specs = {s.name: s for s in create_model("resnet14", layer_gates=True, channel_gates=True, exits=True).specs()}
    spec_cols = ("block", "role", "gate_kind", "out_gate", "in_gate")
    out = [{**r, **{c: getattr(specs[r["layer"]], c) for c in spec_cols}} for r in rows]
    priced = {r["layer"] for r in rows}
    for s in specs.values():
        if s.name not in priced:
            out += [{"layer": s.name, "axis": "out", "active": k, "kind": s.kind, "in_ch": s.in_ch, "out_h": s.out_h,
                     "out_w": s.out_w, "kernel_h": s.kernel_h, **{c: getattr(s, c) for c in spec_cols},
                     **dict.fromkeys(COUNT_COLUMNS, 0)} for k in range(s.out_ch + 1)]
    return pd.DataFrame(out)


def test_counts_from_runs_follow_the_real_engine_launches(tiny_bundle):
    """Calibration counts replayed from decisions == counts of the launches the engine really got,
    plus the exit's one-pass max pool on the ARM where the runner really made it."""

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
                             "dram_reads_filter": v, "dram_writes_ofmap": 0, "block": layer.name, "kind": "conv",
                             "in_ch": layer.in_ch, "out_h": 1, "out_w": 1, "kernel_h": 1})
    rows += _exit_pool_table_rows(bundle, lambda shape: 7 * int(np.prod(shape)))
    counts = counts_from_runs(_with_every_row(rows), bundle, results)
    maps = [a for r in results for op, a, _ in r.processor_maps if op == "maxpool"]  # what the runner pooled
    assert len(maps) == 1 and results[-1].exit_taken == 0  # the exit image: one pass over its map
    expect = (sum(1000 * i + 10 * k + (1 if axis == "in" else 0) for i, axis, k in launches)
              + sum(7 * int(np.prod(a)) for a in maps)) / len(results)
    assert counts["macs"] == pytest.approx(expect) and counts["cycles"] == pytest.approx(2 * expect)
    assert counts["dram_accesses"] == pytest.approx(expect) and counts["rf_accesses"] == pytest.approx(3 * expect)
    assert len(launches) < 4 * len(bundle.layers)  # skipped blocks and the exit launched less


def test_counts_from_runs_refuse_a_table_with_two_pass_exit_pools(tiny_bundle):
    """A cost table that prices an exit's max pool as successive 2x2 passes (profiled before the
    one-pass dataflow) does not describe what the runner did: refused, one line, naming the fix."""

    from ddi_hw.calibrate import counts_from_runs
    from energy_models.scalesim_runner import COUNT_COLUMNS

    bundle, images = tiny_bundle
    result = run_image(bundle, images[0], ReferenceBackend(), exit_at=0)
    step = next(st for st in bundle.program if st["op"] == "exit" and st["index"] == 0)
    assert step["pool"] == 4  # 32x32 -> 8x8
    rows = [{"layer": layer.name, "axis": "out", "active": layer.out_ch, "block": layer.name, "kind": "conv",
             "in_ch": layer.in_ch, "out_h": 1, "out_w": 1, "kernel_h": 1, **dict.fromkeys(COUNT_COLUMNS, 1)}
            for layer in bundle.layers]
    one = _exit_pool_table_rows(bundle, lambda shape: 1)
    assert counts_from_runs(_with_every_row(rows + one), bundle, [result])["macs"] > 0
    two = _exit_pool_table_rows(bundle, lambda shape: 1, kernel=2)  # the first 2x2 pass ...
    two += [{**two[0], "layer": "exits.0.pool#1", "out_h": 8, "out_w": 8}]  # ... and the second
    with pytest.raises(UserError, match=r"exits.0's max pool as \['exits.0.pool#0', 'exits.0.pool#1'\]") as err:
        counts_from_runs(_with_every_row(rows + two), bundle, [result])
    assert "\n" not in str(err.value) and "ddi-hw profile" in str(err.value)
