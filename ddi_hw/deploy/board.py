"""PYNQ driver of the ddi_engine overlay on the ZedBoard: the `board` backend.

One class over `pynq.Overlay`, in the manner of FINN's driver_base.py: explicit register offsets
(all taken from ddi_hw/deploy/regmap.yaml through `load_regmap`, never written here), contiguous DDR
buffers from `pynq.allocate`, start by ap_start and completion by polling ap_done with a timeout.
What runs on the ARM (the gates' vector layers, the exits' one-pass max pools and FCs, the classifier) and
which launches are made (the gates' and exits' convs included) is `backends.run_image`, identical
for every backend, so a whole dynamic inference on the board takes the same decisions as the reference.

The overlay's AXI GPIO (if present) is the measurement marker: high while an inference window
runs, for a scope or a meter with a trigger input; host timestamps of the same windows go to the
windows CSV (`ddi_hw.power.windows`). AXI GPIO registers (Xilinx PG144): GPIO_DATA at 0x0,
GPIO_TRI at 0x4 (0 = output).

The engine's driver is `DdiEngine`, a `pynq.DefaultIP` subclass bound by VLNV (`bindto`), the
usual pynq idiom: any overlay whose .hwh holds an ENGINE_VLNV instance gets it, whatever the
instance is called. pynq is imported only when a BoardBackend is created (`engine_driver`);
elsewhere use --backend reference or csim.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ddi_hw.deploy.backends import Backend, LayerRun, run_image
from ddi_hw.deploy.regmap import load_regmap
from ddi_hw.errors import UserError

DEFAULT_BITFILE = Path(__file__).resolve().parents[2] / "fpga" / "overlay" / "ddi_engine.bit"
GPIO_DATA, GPIO_TRI = 0x0, 0x4
# The HLS IP's VLNV: fpga/vivado/hls.tcl exports it (config_export -vendor/-library/-version) and
# overlay.tcl instantiates it; tests/test_board.py checks both scripts name this one.
ENGINE_VLNV = f"ddi-hw:hls:{load_regmap().top}:1.0"
_DRIVER: dict[str, type] = {}


class BoardTimeout(RuntimeError):
    """The engine did not raise ap_done in time (overlay not loaded, bad address, hang)."""


def import_pynq():
    try:
        with warnings.catch_warnings():  # pynq 3.1's own deprecation noise (pkg_resources, pydantic)
            warnings.simplefilter("ignore")
            import pynq
    except ImportError:
        raise UserError("the board backend needs pynq (on the ZedBoard's PYNQ image); "
                        "here use --backend reference or csim") from None
    return pynq


def engine_driver(pynq) -> type:
    """The DdiEngine driver class, defined once pynq is imported (defining a DefaultIP subclass
    registers its `bindto` VLNVs with pynq, so Overlays made afterwards bind it)."""
    if "engine" not in _DRIVER:
        class DdiEngine(pynq.DefaultIP):
            """ddi_engine's AXI-Lite control: registers by name from regmap.yaml, ap_start/ap_done."""
            bindto = [ENGINE_VLNV]

            def __init__(self, description):
                super().__init__(description=description)
                self.rm = load_regmap()

            def start_and_wait(self, what: str, timeout_s: float) -> None:
                ctrl, bits = self.rm.control["AP_CTRL"], self.rm.ap_ctrl_bits
                self.write(ctrl, 1 << bits["ap_start"])
                deadline = time.monotonic() + timeout_s
                while True:
                    status = int(self.read(ctrl))
                    if status & (1 << bits["ap_done"]):
                        return
                    if time.monotonic() > deadline:
                        raise BoardTimeout(f"{self.rm.top} did not finish {what} within {timeout_s} s "
                                           f"(AP_CTRL={status:#x}); reload the overlay")

        _DRIVER["engine"] = DdiEngine
    return _DRIVER["engine"]


def _find_ip(ip_dict: dict, *needles: str) -> str | None:
    for name in ip_dict:
        if any(n in name.lower() for n in needles):
            return name
    return None


class BoardBackend(Backend):
    """The ddi_engine in the programmable logic, driven through pynq's Overlay, MMIO and
    allocate on `pynq.Device.active_device` (the board; tests install a test Device)."""

    name = "board"

    def __init__(self, bitfile: str | Path | None = None, *, ip_name: str | None = None,
                 gpio_name: str | None = None, timeout_s: float = 2.0, download: bool = True):
        pynq = import_pynq()
        try:
            with warnings.catch_warnings():  # pynq's "is the XRT environment sourced?" on no device
                warnings.simplefilter("ignore")
                pynq.Device.active_device  # the board's device (found by pynq's probing)
        except RuntimeError:
            raise UserError("pynq found no FPGA device: the board backend runs on the ZedBoard's "
                            "PYNQ image; here use --backend reference or csim") from None
        bitfile = Path(bitfile or DEFAULT_BITFILE)
        if not bitfile.is_file():
            raise UserError(f"overlay {bitfile} not found: build it with fpga/vivado (see fpga/README) "
                            "and copy the .bit and .hwh next to each other")
        self.rm = load_regmap()
        driver = engine_driver(pynq)
        self.overlay = pynq.Overlay(str(bitfile), download=download)
        name = ip_name or next((n for n, d in self.overlay.ip_dict.items() if d.get("type") == ENGINE_VLNV), None)
        if name is None:
            raise UserError(f"overlay {bitfile.name} has no {ENGINE_VLNV} IP "
                            f"(found {sorted(self.overlay.ip_dict)}); rebuild the overlay with fpga/vivado")
        self.ip = getattr(self.overlay, name)
        if not isinstance(self.ip, driver):
            raise UserError(f"overlay IP {name} is not bound to the {ENGINE_VLNV} driver; rebuild the overlay")
        gname = gpio_name or _find_ip(self.overlay.ip_dict, "gpio")
        self.gpio = getattr(self.overlay, gname) if gname else None
        if self.gpio is not None:
            self.gpio.write(GPIO_TRI, 0)
            self.gpio.write(GPIO_DATA, 0)
        self.allocate = pynq.allocate
        self.timeout_s = timeout_s
        self.blob = None
        self.bufs: dict[str, object] = {}
        self.launches = 0

    # --- buffers -----------------------------------------------------------------------------
    def _buf(self, key: str, n_items: int, dtype) -> np.ndarray:
        """A contiguous DDR buffer reused across launches; grown (never shrunk) when too small."""
        b = self.bufs.get(key)
        if b is None or b.size < n_items or b.dtype != np.dtype(dtype):
            if b is not None and hasattr(b, "freebuffer"):
                b.freebuffer()
            b = self.allocate(shape=(max(n_items, 1),), dtype=dtype, cacheable=False)
            self.bufs[key] = b
        return b

    @staticmethod
    def _addr(buf) -> int:
        addr = int(buf.device_address)
        if addr >= 1 << 32:
            raise UserError(f"buffer at {addr:#x} is above 4 GB; the engine has 32-bit AXI addresses")
        return addr

    def prepare(self, bundle) -> None:
        """Copy the bundle's engine.bin (all weights, biases, affines) to DDR once."""
        blob = np.frombuffer(bundle.engine_blob, dtype=np.uint8)
        self.blob = self._buf("blob", blob.size, np.uint8)
        self.blob[:blob.size] = blob
        self.blob.flush()
        self.blob_addr = self._addr(self.blob)

    # --- one engine launch ---------------------------------------------------------------------
    def run_layer(self, layer, x, residual=None, out_mask=None, in_mask=None) -> LayerRun:
        if self.blob is None:
            raise RuntimeError("call prepare(bundle) before run_layer")
        rm, p = self.rm, layer.params
        c, h, w = x.shape
        oh, ow = p.out_hw(h, w)
        mc = rm.constants
        if max(c, layer.out_ch) > mc["MAX_CH"] or w > mc["MAX_W"]:
            raise UserError(f"layer {layer.name}: {c}->{layer.out_ch} channels, width {w} exceed the "
                            f"engine (MAX_CH={mc['MAX_CH']}, MAX_W={mc['MAX_W']})")
        xin = self._buf("in", x.size, np.int16)
        xin[:x.size] = x.reshape(-1)
        xin.flush()
        n_map = layer.out_ch * oh * ow if p.store else 0
        n_pool = 2 * layer.out_ch if p.pool else 0  # FLAG_POOL: int32 sums after the ofmap
        out = self._buf("out", n_map + n_pool, np.int16)
        res_addr = 0
        if p.residual:
            rb = self._buf("res", residual.size, np.int16)
            rb[:residual.size] = residual.reshape(-1)
            rb.flush()
            res_addr = self._addr(rb)
        off = layer.offsets
        values = {
            "input": self._addr(xin), "weights": self.blob_addr + off["weights"],
            "bias": self.blob_addr + off["bias"], "output": self._addr(out), "residual": res_addr,
            "pre": self.blob_addr + off["pre"] if p.pre_affine else 0,
            "in_ch": c, "out_ch": layer.out_ch, "in_h": h, "in_w": w, "out_h": oh, "out_w": ow,
            "flags": rm.flag_word(kernel=p.kernel, stride=p.stride, relu=p.relu, residual=p.residual,
                                  pre_affine=p.pre_affine, pool=p.pool, store=p.store,
                                  zero_masked=p.zero_masked),
            "acc_shift": p.acc_shift, "res_shift": p.res_shift, "pre_shift": p.pre_shift,
        }
        masks = {"out_mask": np.ones(layer.out_ch) if out_mask is None else out_mask,
                 "in_mask": np.ones(c) if in_mask is None else in_mask}
        for reg in rm.registers:  # the register map's order, so the sequence is reproducible
            if reg.access != "w":
                continue
            if reg.words > 1:
                for i, word in enumerate(rm.mask_words(masks[reg.name])):
                    self.ip.write(reg.offset + 4 * i, word)
            else:
                self.ip.write(reg.offset, int(values[reg.name]))
        self.ip.start_and_wait(layer.name, self.timeout_s)
        out.invalidate()
        if p.store:
            result = np.array(out[:n_map], dtype=np.int16).reshape(layer.out_ch, oh, ow)
        else:
            result = np.zeros((layer.out_ch, oh, ow), dtype=np.int16)
        pooled = np.array(out[n_map:n_map + n_pool], dtype=np.int16).view("<i4") if p.pool else None
        iters = int(self.ip.read(rm.reg("iterations").offset))
        self.launches += 1
        return LayerRun(result, iters, pooled)

    # --- whole inferences and the marker ------------------------------------------------------
    def marker(self, level: int) -> None:
        if self.gpio is not None:
            self.gpio.write(GPIO_DATA, 1 if level else 0)

    def infer(self, bundle, image: np.ndarray, exit_at: int | None = None):
        """One dynamic inference: gates/exits on the ARM, conv layers on the engine."""
        if self.blob is None:
            self.prepare(bundle)
        return run_image(bundle, image, self, exit_at)

    def close(self) -> None:
        for b in self.bufs.values():
            if hasattr(b, "freebuffer"):
                b.freebuffer()
        self.bufs.clear()
        self.blob = None


def measure(bundle, images, backend: Backend, recorder, config: str, repeats: int = 3,
            idle_s: float = 2.0, exit_at: int | None = None, progress: bool = True) -> list:
    """Run `images` `repeats` times inside marked windows with idle windows before and after
    (the baseline `ddi-hw power analyze` subtracts). Works with every backend, so the same code
    is exercised off-board; only on the board does the logged power mean anything."""
    backend.prepare(bundle)
    results = []
    recorder.idle(idle_s)
    for rep in range(repeats):
        with recorder.window(config, repeat=rep, n_inferences=len(images)):
            for img in images:
                results.append(run_image(bundle, img, backend, exit_at))
        if progress:
            print(f"measuring {config}: repeat {rep + 1}/{repeats}", file=sys.stderr, flush=True)
    recorder.idle(idle_s)
    return results
