"""Hardware presets: what the accelerator is (SCALE-Sim array and SRAMs) and what each action costs.

Presets are YAML files shipped in `energy_models/presets/` (name them by file stem) or any YAML
file a user copies from one. Every field is checked so a typo gives one line naming the field.

A preset with `engine: NAME` describes that engine (energy_models/engines/NAME.yaml): its array,
SRAM sizes, dataflow and clock come from there and may not be typed again in the preset.
Optional: `board_power_w` (board-level power drawn while an inference runs: PS, DDR background,
regulators; charged for the inference time) and `processor` (the host CPU that runs the gates'
vector layers: effective MACs per second; its power is part of `board_power_w`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from energy_models.errors import UserError

DEFAULT_PRESET = "eyeriss-65nm"  # the preset used when none is named (profiler, training, CLI)
DATAFLOWS = ("os", "ws", "is")
ENERGY_FIELDS = ("mac_pj", "rf_pj", "noc_pj", "sram_pj", "dram_pj")
SIM_INT_FIELDS = ("array_rows", "array_cols", "ifmap_sram_kb", "filter_sram_kb", "ofmap_sram_kb")
# Plausibility bounds far beyond any real accelerator: they keep SCALE-Sim's matrices allocatable
# and every Eq. 6 product finite (a typo such as 1e300 is refused, not simulated).
SIM_INT_MAX = {"array_rows": 4096, "array_cols": 4096, "ifmap_sram_kb": 1 << 20, "filter_sram_kb": 1 << 20,
               "ofmap_sram_kb": 1 << 20}
MAX_ACCESS_PJ, MAX_CLOCK_HZ, MAX_STATIC_W = 1e6, 1e12, 1e4


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    array_rows: int
    array_cols: int
    ifmap_sram_kb: float  # KB of words; fractional only when derived from an engine's buffers
    filter_sram_kb: float
    ofmap_sram_kb: float
    dataflow: str
    bandwidth_mode: str
    mac_pj: float
    rf_pj: float
    noc_pj: float
    sram_pj: float
    dram_pj: float
    clock_hz: float
    static_power_w: float
    board_power_w: float = 0.0
    proc_macs_per_s: float | None = None  # host processor (gate vector layers); None: no processor
    engine: str | None = None

    def simulator_fields(self, dataflow: str | None = None) -> dict:
        """What SCALE-Sim sees: the only preset fields that may change access counts."""
        d = {k: getattr(self, k) for k in SIM_INT_FIELDS}
        d["dataflow"] = dataflow or self.dataflow
        d["bandwidth_mode"] = self.bandwidth_mode
        return d

    def as_dict(self) -> dict:
        return asdict(self)


def available_presets() -> list[str]:
    folder = resources.files("energy_models") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path) -> Preset:
    """A shipped preset by name (e.g. "eyeriss-65nm"), a user YAML file, or a SCALE-Sim `.cfg` with
    its energy sidecar (docs/SCALESIM.md), fully validated."""
    import yaml

    if isinstance(name_or_path, Preset):
        return name_or_path
    if str(name_or_path).lower().endswith(".cfg"):  # a SCALE-Sim config plus its energy sidecar
        from energy_models.scalesim_files import preset_mapping_from_cfg

        data, label = preset_mapping_from_cfg(name_or_path)
        return preset_from_mapping(data, label)
    text, label = _read(str(name_or_path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"preset {label}: not valid YAML{where}; fix the syntax") from None
    return preset_from_mapping(data, label)


def preset_from_mapping(data, label: str) -> Preset:
    """A validated `Preset` from the preset file's mapping (`label` names the file in errors)."""
    if not isinstance(data, dict):
        raise UserError(f"preset {label}: expected a mapping with 'simulator' and 'energy' sections")

    def section(key):
        sec = data.get(key)
        if not isinstance(sec, dict):
            raise UserError(f"preset {label}: section '{key}' is missing or not a mapping")
        return sec

    def positive(value, field, integer=False, high=None):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and value > 0 and (high is None or value <= high)
        if integer:
            ok = ok and float(value).is_integer()
        if not ok:
            kind = "a positive integer" if integer else "a finite positive number"
            limit = f" up to {high:g}" if high is not None else ""
            raise UserError(f"preset {label}: field '{field}' must be {kind}{limit} (got {value!r})")
        return int(value) if integer else float(value)

    def non_negative(value, field):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value >= 0):
            raise UserError(f"preset {label}: field '{field}' must be a number >= 0 "
                            f"(got {value!r})")
        return float(value)

    top = {"name", "description", "simulator", "energy", "clock_hz", "static_power_w", "engine",
           "board_power_w", "processor"}
    _no_unknown(label, data, None, top)
    engine = data.get("engine")
    if engine is not None:
        from energy_models.engine import load_engine

        typed = [k for k in ("simulator", "clock_hz") if k in data]
        if typed:
            raise UserError(f"preset {label}: '{typed[0]}' comes from engine '{engine}' "
                            f"(energy_models/engines/{engine}.yaml); remove it from the preset")
        eng = load_engine(str(engine))
        sim = eng.simulator_fields()
        data = {**data, "clock_hz": eng.clock_mhz * 1e6}
        fields = {f: sim[f] for f in SIM_INT_FIELDS}
    else:
        sim = section("simulator")
        _no_unknown(label, sim, "simulator", set(SIM_INT_FIELDS) | {"dataflow", "bandwidth_mode"})
        fields = {f: positive(sim.get(f), f"simulator.{f}", integer=True, high=SIM_INT_MAX[f]) for f in SIM_INT_FIELDS}
    energy = section("energy")
    _no_unknown(label, energy, "energy", set(ENERGY_FIELDS))
    dataflow = sim.get("dataflow", "os")
    if dataflow not in DATAFLOWS:
        raise UserError(f"preset {label}: field 'simulator.dataflow' must be one of "
                        f"{', '.join(DATAFLOWS)} (got {dataflow!r})")
    if sim.get("bandwidth_mode", "CALC") != "CALC":
        raise UserError(f"preset {label}: field 'simulator.bandwidth_mode' must be CALC "
                        "(the only mode the profiler runs SCALE-Sim in)")
    for f in ENERGY_FIELDS:
        fields[f] = positive(energy.get(f), f"energy.{f}", high=MAX_ACCESS_PJ)
    proc = data.get("processor")
    if proc is not None:
        if not isinstance(proc, dict):
            raise UserError(f"preset {label}: section 'processor' must be a mapping")
        _no_unknown(label, proc, "processor", {"macs_per_s"})
        fields["proc_macs_per_s"] = positive(proc.get("macs_per_s"), "processor.macs_per_s")
    name = data.get("name", Path(label).stem)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"preset {label}: field 'name' must be text (got {name!r})")
    static_w = non_negative(data.get("static_power_w"), "static_power_w")
    if static_w > MAX_STATIC_W:
        raise UserError(f"preset {label}: field 'static_power_w' must be at most {MAX_STATIC_W:g} W (got {static_w!r})")
    clock = positive(data.get("clock_hz"), "clock_hz", high=MAX_CLOCK_HZ)
    if clock < 1:
        raise UserError(f"preset {label}: field 'clock_hz' must be at least 1 Hz (got {clock!r})")
    return Preset(
        name=str(name), description=str(data.get("description", "")), dataflow=dataflow,
        bandwidth_mode="CALC", clock_hz=positive(data.get("clock_hz"), "clock_hz"),
        static_power_w=non_negative(data.get("static_power_w"), "static_power_w"),
        board_power_w=non_negative(data.get("board_power_w", 0.0), "board_power_w"),
        engine=None if engine is None else str(engine), **fields)


def _no_unknown(label: str, sec: dict, key: str | None, allowed: set) -> None:
    for extra in sorted(set(sec) - allowed):
        field = f"{key}.{extra}" if key else extra
        raise UserError(f"preset {label}: unknown field '{field}'; allowed: "
                        f"{', '.join(sorted(allowed))}")


def _read(name: str) -> tuple[str, str]:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"preset file {name} not found; give a shipped preset "
                            f"({', '.join(available_presets())}), a YAML file or a SCALE-Sim .cfg")
        try:
            return path.read_bytes().decode("utf-8"), path.name
        except UnicodeDecodeError as err:
            raise UserError(f"preset file {name} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    shipped = resources.files("energy_models") / "presets" / f"{name}.yaml"
    if not shipped.is_file():
        raise UserError(f"unknown hardware preset '{name}'; choose one of "
                        f"{', '.join(available_presets())} or give a YAML file or a SCALE-Sim .cfg")
    return shipped.read_text(), f"{name}.yaml"
