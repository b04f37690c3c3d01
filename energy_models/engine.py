"""The accelerator engine the `zedboard` preset describes: `engines/ddi_engine.yaml`, read once.

Why a file of its own: the PE array, the on-chip buffers and the clock of the HLS engine
(fpga/hls/ddi_engine.cpp) must be typed once. `ddi_hw.regmap` generates fpga/hls/regmap.h from
these constants (the HLS code, the Vivado scripts and the driver use that header), and a preset
that says `engine: ddi_engine` takes its SCALE-Sim array, SRAM sizes and clock from here.
`dataflow` says what runs where (see energy_models/dataflow.py, which applies it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from ddi_hw.errors import UserError as EnergyModelError  # issue 10 gives energy_models its own type

CONSTANTS = ("MAX_CH", "MAX_W", "MASK_WORDS", "TILE_OUT", "TILE_IN", "TILE_ROWS", "ACC_BITS",
             "DATA_BITS")


@dataclass(frozen=True)
class Engine:
    name: str
    clock_mhz: int
    constants: dict
    dataflow: dict

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
        """SCALE-Sim configured as this engine, as closely as SCALE-Sim allows:
        - weight stationary: the engine holds a TILE_OUT x TILE_IN weight tile per kernel tap and
          streams the output pixels through it, reducing TILE_IN input channels per cycle; in
          SCALE-Sim's WS array the rows reduce (filter window elements) and the columns are filters,
          so rows = TILE_IN, cols = TILE_OUT;
        - SRAMs: SCALE-Sim's scratchpads are double buffered (half of each is the active buffer),
          the engine's are single buffered, so each SCALE-Sim SRAM is twice the engine buffer:
          input tile, weight tile, accumulators. Sizes in KB of words (1024 words = 1 KB here),
          fractional where the buffer is not a multiple of 1024 words."""
        c = self.constants
        return dict(array_rows=c["TILE_IN"], array_cols=c["TILE_OUT"],
                    ifmap_sram_kb=2 * self.ibuf_words / 1024,
                    filter_sram_kb=2 * self.wbuf_words / 1024,
                    ofmap_sram_kb=2 * self.acc_words / 1024, dataflow="ws")


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
                  constants=dict(consts), dataflow=dict(raw.get("dataflow") or {}))
