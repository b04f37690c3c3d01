"""The accelerator engine the `zedboard` preset describes: `engines/ddi_engine.yaml`, read once.

Why a file of its own: the PE array, the on-chip buffers and the clock of the HLS engine
(fpga/hls/ddi_engine.cpp) must be typed once. `ddi_hw.deploy.regmap` generates fpga/hls/regmap.h from
these constants (the HLS code, the Vivado scripts and the driver use that header), and a preset
that says `engine: ddi_engine` takes its SCALE-Sim array, SRAM sizes and clock from here.
`dataflow` says what runs where (see energy_models/dataflow.py, which applies it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from energy_models.errors import UserError as EnergyModelError

CONSTANTS = ("MAX_CH", "MAX_W", "MASK_WORDS", "TILE_OUT", "TILE_IN", "TILE_ROWS", "ACC_BITS",
             "DATA_BITS")


@dataclass(frozen=True)
class Engine:
    name: str
    clock_mhz: int
    constants: dict
    dataflow: dict
    transfer: dict

    # on-chip buffers, in 16-bit words, exactly as declared in ddi_engine.cpp / ddi_engine.h
    @property
    def ibuf_words(self) -> int:
        c = self.constants
        return c["TILE_IN"] * ((c["TILE_ROWS"] - 1) * 2 + 3) * (c["MAX_W"] + 2)

    @property
    def wbuf_words(self) -> int:
        return self.constants["TILE_OUT"] * self.constants["TILE_IN"] * 9

    @property
    def acc_words(self) -> int:
        c = self.constants
        return c["TILE_OUT"] * c["TILE_ROWS"] * c["MAX_W"]

    def simulator_fields(self) -> dict:
        """SCALE-Sim configured as this engine, as closely as SCALE-Sim allows. SCALE-Sim runs
        one engine tile at a time (`tiled_counts`: TILE_ROWS output rows x TILE_OUT filters, all
        input channels), so:
        - output stationary, TILE_IN x TILE_OUT: the engine keeps each output's partial sum in
          its accumulator until the whole window is summed (never spilled) and does
          TILE_OUT x TILE_IN = 128 MACs per cycle; SCALE-Sim's OS array with 8 rows (output pixels)
          x 16 columns (filters) does the same MACs per cycle and keeps psums in the PEs;
        - SRAMs hold one tile's operands at MAX_CH input channels, so SCALE-Sim fetches each word
          once per tile, which is the engine's traffic: it streams the input channels through its
          TILE_IN-channel BRAM tiles and fetches each word once per tile (sizes in KB of words,
          x2 for SCALE-Sim's double buffering)."""
        c = self.constants
        slab = c["MAX_CH"] * ((c["TILE_ROWS"] - 1) * 2 + 3) * (c["MAX_W"] + 2)
        weights = c["TILE_OUT"] * c["MAX_CH"] * 9
        return dict(array_rows=c["TILE_IN"], array_cols=c["TILE_OUT"],
                    ifmap_sram_kb=2 * slab // 1024, filter_sram_kb=2 * weights // 1024,
                    ofmap_sram_kb=2 * self.acc_words // 1024, dataflow="os")

    def row_tiles(self, spec) -> list[tuple[int, int, float]]:
        """(slab rows handed to SCALE-Sim, number of such row tiles, share of the slab inside the
        image) for a conv spec; the slab is padded (SCALE-Sim does not pad), the padding is not
        fetched by the engine."""
        tr, k, s, pad = self.constants["TILE_ROWS"], spec.kernel_h, spec.stride, spec.padding
        iw = (spec.out_w - 1) * s + spec.kernel_w
        valid_cols = sum(1 for x in range(-pad, -pad + iw) if 0 <= x < spec.in_w)
        tiles: dict[tuple[int, float], int] = {}
        for r0 in range(0, spec.out_h, tr):
            rows = min(tr, spec.out_h - r0)
            ir = (rows - 1) * s + k
            y0 = r0 * s - pad
            valid_rows = sum(1 for y in range(y0, y0 + ir) if 0 <= y < spec.in_h)
            key = (ir, valid_rows * valid_cols / (ir * iw))
            tiles[key] = tiles.get(key, 0) + 1
        return [(ir, n, valid) for (ir, valid), n in sorted(tiles.items())]

    def transfer_cycles(self, words: int) -> int:
        """Cycles the un-overlapped loads and stores of `words` take (0 if overlapped)."""
        if self.transfer.get("overlapped_with_compute", True):
            return 0
        return -(-int(words) // int(self.transfer.get("words_per_cycle", 1)))


@lru_cache(maxsize=None)
def load_engine(name: str = "ddi_engine") -> Engine:
    import yaml

    f = resources.files("energy_models") / "engines" / f"{name}.yaml"
    if not f.is_file():
        raise EnergyModelError(f"unknown engine '{name}'; shipped: ddi_engine")
    raw = yaml.safe_load(f.read_text())
    consts = raw.get("constants") or {}
    missing = [k for k in CONSTANTS if not isinstance(consts.get(k), int)]
    if missing:
        raise EnergyModelError(f"engine {name}: constants {missing} missing or not integers")
    if consts["MASK_WORDS"] * 32 != consts["MAX_CH"]:
        raise EnergyModelError(f"engine {name}: MASK_WORDS must be MAX_CH / 32")
    return Engine(name=str(raw.get("name", name)), clock_mhz=int(raw["clock_mhz"]),
                  constants=dict(consts), dataflow=dict(raw.get("dataflow") or {}),
                  transfer=dict(raw.get("transfer") or {}))
