"""C-simulation of the HLS engine from Python: the real ddi_engine.cpp compiled with g++ against
the open ap_types headers into a shared library and called through ctypes, one layer at a time.

Also writes the layer test vectors the C test bench checks (`make -C fpga/hls test` calls
`python -m ddi_hw.deploy.csim vectors DIR`): random ResNet-like and DenseNet-like layers, masked and
unmasked, with the expected outputs from the numpy reference `ddi_hw.deploy.fixedpoint`.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddi_hw.deploy.fixedpoint import LayerParams, conv_layer
from ddi_hw.deploy.regmap import load_regmap
from ddi_hw.errors import UserError

HLS_DIR = Path(__file__).resolve().parents[2] / "fpga" / "hls"
LIB_PATH = HLS_DIR / "build" / "libddi_engine.so"


def ap_types_dir() -> Path | None:
    """The ap_int/ap_fixed headers shipped in the hls4ml wheel (located, never imported)."""
    import importlib.util
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(spec.submodule_search_locations[0]) / "templates" / "vivado" / "ap_types"
    return d if (d / "ap_int.h").is_file() else None


def toolchain_missing() -> str | None:
    """Why the C-simulation cannot be built here, or None if it can."""
    if shutil.which("g++") is None or shutil.which("make") is None:
        return "g++/make not found: install build-essential"
    if ap_types_dir() is None:
        return "ap_types headers not found: pip install --no-deps hls4ml"
    return None


_LIB = None


def load_library(rebuild: bool = False) -> ctypes.CDLL:
    """Build (make lib; a no-op when up to date) and load the engine library."""
    global _LIB
    if _LIB is not None and not rebuild:
        return _LIB
    why = toolchain_missing()
    if why:
        raise UserError(f"cannot build the C-simulation: {why}")
    res = subprocess.run(["make", "-s", "-C", str(HLS_DIR), "lib", f"PYTHON={sys.executable}"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"building fpga/hls/build/libddi_engine.so failed: {res.stderr.strip()[-400:]}")
    lib = ctypes.CDLL(str(LIB_PATH))
    p16, p32, pu32, u32 = (ctypes.POINTER(ctypes.c_int16), ctypes.POINTER(ctypes.c_int32),
                           ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32)
    lib.ddi_engine_run.argtypes = [p16, p16, p32, p16, p16, p32] + [u32] * 10 + [pu32, pu32, pu32]
    lib.ddi_engine_run.restype = ctypes.c_int
    lib.ddi_regmap_version.restype = ctypes.c_int
    lib.ddi_engine_counters.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    lib.ddi_engine_counters.restype = None
    lib.ddi_engine_size.argtypes = [ctypes.c_int]
    lib.ddi_engine_size.restype = ctypes.c_int
    if lib.ddi_regmap_version() != load_regmap().version:
        raise UserError("libddi_engine.so was built from another regmap version: make -C fpga/hls clean lib")
    _LIB = lib
    return lib


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


# C-sim counters of one launch (fpga/hls/ddi_engine.h `ddi_counters`, same order): cycles =
# pipelined-loop iterations (loads, MACs, stores; II=1), dram_* = 16-bit words per DDR port.
COUNTERS = ("cycles", "dram_input", "dram_weights", "dram_bias", "dram_pre", "dram_residual",
            "dram_output", "dram_pooled")


@dataclass
class EngineRun:
    output: np.ndarray  # (out_ch, OH, OW) int16 (zeros if the layer does not store)
    iterations: int  # MAC-loop iterations (the `iterations` register)
    pooled: np.ndarray | None  # (out_ch,) int32 sums if params.pool
    counters: dict  # COUNTERS -> count (C-simulation instrumentation)

    @property
    def dram_words(self) -> int:
        return sum(v for k, v in self.counters.items() if k.startswith("dram_"))


def buffer_words() -> dict:
    """The engine's on-chip buffer sizes (words) as compiled: input tile, weight tile, accumulators."""
    lib = load_library()
    return {k: lib.ddi_engine_size(i) for i, k in enumerate(("ibuf", "wbuf", "acc"))}


def run_layer(x, w, bias, p: LayerParams, residual=None, pre=None, out_mask=None, in_mask=None):
    """Run one layer through the C-simulated engine. Same arguments and result as
    `fixedpoint.conv_layer`, plus the engine's compute-loop iteration count (a cycle proxy)."""
    r = run_layer_full(x, w, bias, p, residual, pre, out_mask, in_mask)
    return r.output, r.iterations


def run_layer_full(x, w, bias, p: LayerParams, residual=None, pre=None, out_mask=None,
                   in_mask=None) -> EngineRun:
    """`run_layer` plus the pooled sums (FLAG_POOL) and the C-sim DRAM/cycle counters."""
    lib = load_library()
    rm = load_regmap()
    c, h, wd = x.shape
    o = w.shape[0]
    oh, ow = p.out_hw(h, wd)
    if w.shape != (o, c, p.kernel, p.kernel) or bias.shape != (o,):
        raise ValueError(f"weights {w.shape} / bias {bias.shape} do not match the layer")
    xs = np.ascontiguousarray(x, dtype=np.int16)
    ws = np.ascontiguousarray(w, dtype=np.int16)
    bs = np.ascontiguousarray(bias, dtype=np.int32)
    rs = np.ascontiguousarray(residual if p.residual else np.zeros(1), dtype=np.int16)
    if p.residual and rs.shape != (o, oh, ow):
        raise ValueError(f"residual must have the output shape {(o, oh, ow)}")
    ps = np.ascontiguousarray(pre if p.pre_affine else np.zeros((1, 2)), dtype=np.int32)
    om = np.array(rm.mask_words(np.ones(o) if out_mask is None else out_mask), dtype=np.uint32)
    im = np.array(rm.mask_words(np.ones(c) if in_mask is None else in_mask), dtype=np.uint32)
    n_map = o * oh * ow if p.store else 0
    buf = np.zeros(n_map + (2 * o if p.pool else 0), dtype=np.int16)  # ofmap, then pooled int32s
    iters = np.zeros(1, dtype=np.uint32)
    flags = rm.flag_word(kernel=p.kernel, stride=p.stride, relu=p.relu, residual=p.residual,
                         pre_affine=p.pre_affine, pool=p.pool, store=p.store,
                         zero_masked=p.zero_masked)
    rc = lib.ddi_engine_run(_ptr(xs, ctypes.c_int16), _ptr(ws, ctypes.c_int16), _ptr(bs, ctypes.c_int32),
                            _ptr(buf, ctypes.c_int16), _ptr(rs, ctypes.c_int16), _ptr(ps, ctypes.c_int32),
                            c, o, h, wd, oh, ow, flags, p.acc_shift, p.res_shift, p.pre_shift,
                            _ptr(iters, ctypes.c_uint32), _ptr(om, ctypes.c_uint32), _ptr(im, ctypes.c_uint32))
    if rc != 0:
        raise UserError(f"layer exceeds the engine limits (MAX_CH={rm.constants['MAX_CH']}, "
                        f"MAX_W={rm.constants['MAX_W']}): {c}->{o} channels, width {wd}")
    cnt = np.zeros(len(COUNTERS), dtype=np.uint64)
    lib.ddi_engine_counters(_ptr(cnt, ctypes.c_uint64))
    out = buf[:n_map].reshape(o, oh, ow) if p.store else np.zeros((o, oh, ow), dtype=np.int16)
    pooled = buf[n_map:].copy().view("<i4") if p.pool else None
    return EngineRun(out, int(iters[0]), pooled, dict(zip(COUNTERS, (int(v) for v in cnt))))


def expected_iterations(in_active: int, out_active: int, out_h: int, out_w: int, kernel: int) -> int:
    """Independent count of the engine's pipelined MAC-loop iterations (what `iterations` reports):
    output-channel tiles x input-channel tiles x kernel taps x output pixels."""
    rm = load_regmap().constants
    tiles_o = -(-out_active // rm["TILE_OUT"])
    tiles_i = -(-in_active // rm["TILE_IN"])
    return tiles_o * tiles_i * kernel * kernel * out_h * out_w


def run_spec(spec, rng: np.random.Generator, *, axis: str = "out", active: int | None = None,
             residual: bool = False, pool: bool = False, store: bool = True,
             zero_masked: bool = True) -> EngineRun:
    """One C-simulated launch of a traced conv (`energy_models.specs.LayerSpec`) on random int16
    data, with the first `active` channels of `axis` on (the engine's counts do not depend on
    which ones). For comparing the engine's own DRAM words and cycles with the cost table."""
    k, s = spec.kernel_h, spec.stride
    if spec.kind != "conv" or k not in (1, 3) or spec.kernel_w != k or spec.padding != k // 2 or spec.groups != 1:
        raise UserError(f"layer {spec.name}: not an engine launch (1x1/3x3 'same' conv, stride 1/2)")
    p = LayerParams(kernel=k, stride=s, relu=True, residual=residual, acc_shift=12,
                    res_shift=3 if residual else 0, pool=pool, store=store, zero_masked=zero_masked)
    oh, ow = p.out_hw(spec.in_h, spec.in_w)
    x = rng.integers(-4096, 4096, size=(spec.in_ch, spec.in_h, spec.in_w), dtype=np.int16)
    w = rng.integers(-2048, 2048, size=(spec.out_ch, spec.in_ch, k, k), dtype=np.int16)
    b = rng.integers(-(1 << 20), 1 << 20, size=spec.out_ch).astype(np.int32)
    res = rng.integers(-8192, 8192, size=(spec.out_ch, oh, ow), dtype=np.int16) if residual else None
    n = spec.out_ch if axis == "out" else spec.in_ch
    m = np.zeros(n, dtype=np.uint8)
    m[: n if active is None else active] = 1
    om, im = (m, None) if axis == "out" else (None, m)
    return run_layer_full(x, w, b, p, res, None, om, im)


@dataclass
class LayerCase:
    """One random layer with its reference output (for the C test bench and tests)."""
    name: str
    params: LayerParams
    x: np.ndarray
    w: np.ndarray
    bias: np.ndarray
    residual: np.ndarray | None = None
    pre: np.ndarray | None = None
    out_mask: np.ndarray | None = None
    in_mask: np.ndarray | None = None
    expected: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.expected is None:
            self.expected = conv_layer(self.x, self.w, self.bias, self.params, self.residual,
                                       self.pre, self.out_mask, self.in_mask)


def random_case(rng: np.random.Generator, name: str, in_ch: int, out_ch: int, h: int, w: int,
                kernel: int = 3, stride: int = 1, relu: bool = True, residual: bool = False,
                pre_affine: bool = False, out_keep: float = 1.0, in_keep: float = 1.0,
                acc_shift: int = 12) -> LayerCase:
    """Random int16 data of realistic magnitude; out_keep/in_keep < 1 mask that share of channels."""
    p = LayerParams(kernel=kernel, stride=stride, relu=relu, residual=residual,
                    acc_shift=acc_shift, res_shift=3 if residual else 0,
                    pre_affine=pre_affine, pre_shift=10 if pre_affine else 0)
    oh, ow = p.out_hw(h, w)
    x = rng.integers(-4096, 4096, size=(in_ch, h, w), dtype=np.int16)
    wt = rng.integers(-2048, 2048, size=(out_ch, in_ch, kernel, kernel), dtype=np.int16)
    bias = rng.integers(-(1 << 20), 1 << 20, size=out_ch).astype(np.int32)
    res = rng.integers(-8192, 8192, size=(out_ch, oh, ow), dtype=np.int16) if residual else None
    pre = None
    if pre_affine:
        pre = np.stack([rng.integers(-2048, 2048, size=in_ch), rng.integers(-(1 << 22), 1 << 22, size=in_ch)],
                       axis=1).astype(np.int32)

    def mask(n, keep):
        if keep >= 1.0:
            return None
        m = np.zeros(n, dtype=np.uint8)
        m[rng.permutation(n)[: int(round(n * keep))]] = 1
        return m

    return LayerCase(name, p, x, wt, bias, res, pre, mask(out_ch, out_keep), mask(in_ch, in_keep))


def standard_cases(seed: int = 0) -> list[LayerCase]:
    """ResNet-like (3x3 s1 + residual, 3x3 s2, 1x1 s2 shortcut) and DenseNet-like (1x1 bottleneck
    and 3x3 growth conv with folded pre-activation BN) layers, with and without channel masks,
    plus odd sizes (partial channel and row tiles) and heavy saturation."""
    rng = np.random.default_rng(seed)
    return [
        random_case(rng, "resnet_3x3_s1_res", 16, 16, 8, 8, residual=True),
        random_case(rng, "resnet_3x3_s1_res_out50", 16, 32, 8, 8, residual=True, out_keep=0.5),
        random_case(rng, "resnet_3x3_s1_in50", 32, 16, 8, 8, in_keep=0.5),
        random_case(rng, "resnet_3x3_s2", 16, 32, 10, 10, stride=2),
        random_case(rng, "resnet_3x3_s2_out25", 16, 64, 10, 10, stride=2, out_keep=0.25),
        random_case(rng, "resnet_1x1_s2_shortcut", 16, 32, 8, 8, kernel=1, stride=2, relu=False),
        random_case(rng, "resnet_3x3_rows_tiles", 3, 20, 19, 13),
        random_case(rng, "densenet_1x1_bottleneck", 36, 48, 8, 8, kernel=1, pre_affine=True),
        random_case(rng, "densenet_1x1_bottleneck_m", 36, 48, 8, 8, kernel=1, pre_affine=True,
                    out_keep=0.5, in_keep=0.75),
        random_case(rng, "densenet_3x3_growth", 48, 12, 8, 8, pre_affine=True, relu=False),
        random_case(rng, "saturating", 24, 16, 6, 6, acc_shift=4, relu=False),
    ]


def write_vectors(out_dir: Path, cases: list[LayerCase] | None = None) -> Path:
    """Binary files + cases.txt in the format tb_ddi_engine.cpp reads."""
    rm = load_regmap()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for case in cases or standard_cases():
        p = case.params
        c, h, w = case.x.shape
        o = case.w.shape[0]
        oh, ow = p.out_hw(h, w)
        flags = rm.flag_word(kernel=p.kernel, stride=p.stride, relu=p.relu, residual=p.residual,
                             pre_affine=p.pre_affine)
        files = {"input": case.x.astype("<i2"), "weights": case.w.astype("<i2"),
                 "bias": case.bias.astype("<i4"), "expected": case.expected.astype("<i2"),
                 "residual": (case.residual if p.residual else np.zeros(0)).astype("<i2"),
                 "pre": (case.pre if p.pre_affine else np.zeros(0)).astype("<i4"),
                 "out_mask": np.array(rm.mask_words(np.ones(o) if case.out_mask is None else case.out_mask), "<u4"),
                 "in_mask": np.array(rm.mask_words(np.ones(c) if case.in_mask is None else case.in_mask), "<u4")}
        for key, arr in files.items():
            arr.tofile(out_dir / f"{case.name}.{key}.bin")
        lines.append(f"{case.name} {c} {o} {h} {w} {oh} {ow} {flags} {p.acc_shift} {p.res_shift} {p.pre_shift}")
    (out_dir / "cases.txt").write_text("\n".join(lines) + "\n")
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "vectors":
        sys.exit("usage: python -m ddi_hw.deploy.csim vectors OUT_DIR")
    print(f"wrote {write_vectors(Path(sys.argv[2]))}")
