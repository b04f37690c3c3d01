"""SCALE-Sim's own file formats, so a user can move between plain `scalesim` and this profiler.

- A SCALE-Sim `.cfg` (array, SRAM sizes, dataflow) plus an energy sidecar `<stem>.energy.yaml`
  next to it (per-access energies, clock, static/board power, each with its cited source) is a
  hardware preset: `load_preset("my_accel.cfg")`. docs/SCALESIM.md describes both files.
- `topology_csv`: the SCALE-Sim topology file (its conv column format) of the layers a cost table
  simulates, with inputs padded as the profiler hands them to SCALE-Sim (it does not pad).
"""
from __future__ import annotations

import configparser
from pathlib import Path

from energy_models.errors import UserError

SIDECAR_SUFFIX = ".energy.yaml"
DOC = "docs/SCALESIM.md"
# .cfg key (SCALE-Sim's [architecture_presets] names, case-insensitive) -> preset simulator field
CFG_SIZES = {"ArrayHeight": "array_rows", "ArrayWidth": "array_cols", "IfmapSramSzkB": "ifmap_sram_kb",
             "FilterSramSzkB": "filter_sram_kb", "OfmapSramSzkB": "ofmap_sram_kb"}
SIDECAR_FIELDS = {"name", "description", "energy", "clock_hz", "static_power_w", "board_power_w",
                  "processor", "sources"}
TOPOLOGY_HEADER = "Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, Num Filter, Strides,"


def sidecar_path(cfg_path) -> Path:
    p = Path(cfg_path)
    return p.with_name(p.stem + SIDECAR_SUFFIX)


def read_cfg(path) -> dict:
    """The SCALE-Sim config fields the profiler uses (simulator section of a preset), checked."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"SCALE-Sim config {path} not found; give an existing .cfg file")
    parser = configparser.ConfigParser()
    try:
        parser.read_string(p.read_bytes().decode("utf-8"), str(p.name))
    except (configparser.Error, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0]
        raise UserError(f"SCALE-Sim config {p.name}: not a valid .cfg ({first}); see {DOC}") from None

    def get(section, key):
        if not parser.has_option(section, key):
            raise UserError(f"SCALE-Sim config {p.name}: [{section}] {key} is missing; add it (see {DOC})")
        return parser.get(section, key).strip()

    sim = {}
    for key, field in CFG_SIZES.items():
        raw = get("architecture_presets", key)
        try:
            value = int(raw)
        except ValueError:
            raise UserError(f"SCALE-Sim config {p.name}: [architecture_presets] {key} must be a positive "
                            f"integer (got {raw!r})") from None
        if value <= 0:
            raise UserError(f"SCALE-Sim config {p.name}: [architecture_presets] {key} must be a positive "
                            f"integer (got {raw!r})")
        sim[field] = value
    sim["dataflow"] = get("architecture_presets", "Dataflow").lower()
    if sim["dataflow"] not in ("os", "ws", "is"):
        raise UserError(f"SCALE-Sim config {p.name}: [architecture_presets] Dataflow must be os, ws or is "
                        f"(got {sim['dataflow']!r})")
    mode = get("run_presets", "InterfaceBandwidth")
    if mode != "CALC":
        raise UserError(f"SCALE-Sim config {p.name}: [run_presets] InterfaceBandwidth must be CALC (the only "
                        f"mode the profiler runs SCALE-Sim in; got {mode!r})")
    for section, key in (("sparsity", "SparsitySupport"), ("layout", "IfmapCustomLayout"),
                         ("layout", "FilterCustomLayout"), ("run_presets", "UseRamulatorTrace")):
        if parser.has_option(section, key) and parser.get(section, key).strip().lower() == "true":
            raise UserError(f"SCALE-Sim config {p.name}: [{section}] {key} = true is not supported by the "
                            "profiler; set it to false")
    sim["bandwidth_mode"] = "CALC"
    name = parser.get("general", "run_name", fallback=p.stem).strip() or p.stem
    return dict(simulator=sim, run_name=name)


def preset_mapping_from_cfg(path) -> tuple[dict, str]:
    """(preset mapping, label) from a `.cfg` and its sidecar; `presets.preset_from_mapping` then
    checks every number as for a YAML preset."""
    import yaml

    cfg = read_cfg(path)
    side = sidecar_path(Path(path).expanduser())
    if not side.is_file():
        raise UserError(f"SCALE-Sim config {Path(path).name} needs its energy sidecar {side.name} next to it "
                        f"(per-access energies, clock, static power and their sources; see {DOC})")
    try:
        data = yaml.safe_load(side.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"energy sidecar {side.name}: not valid UTF-8 YAML; fix the syntax (see {DOC})") from None
    if not isinstance(data, dict):
        raise UserError(f"energy sidecar {side.name}: expected a mapping with 'energy', 'clock_hz', "
                        f"'static_power_w' and 'sources' (see {DOC})")
    for key in sorted(set(data) - SIDECAR_FIELDS):
        hint = " (it comes from the .cfg)" if key in ("simulator", "engine") else ""
        raise UserError(f"energy sidecar {side.name}: unknown field '{key}'{hint}; allowed: "
                        f"{', '.join(sorted(SIDECAR_FIELDS))}")
    sources = data.get("sources")
    if not isinstance(sources, dict):
        raise UserError(f"energy sidecar {side.name}: 'sources' must map each number's field to the "
                        f"source it comes from (see {DOC})")
    needed = ["energy", "clock_hz", "static_power_w"] + [k for k in ("board_power_w", "processor") if k in data]
    for key in needed:
        text = sources.get(key)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"energy sidecar {side.name}: field 'sources.{key}' must cite where '{key}' comes "
                            "from (a paper, datasheet, or 'ESTIMATE: why')")
    for key in sorted(set(sources) - set(needed)):
        raise UserError(f"energy sidecar {side.name}: 'sources.{key}' cites a field the sidecar does not set; "
                        f"remove it or set '{key}'")
    mapping = {k: v for k, v in data.items() if k != "sources"}
    mapping.setdefault("name", cfg["run_name"])
    mapping["simulator"] = cfg["simulator"]
    return mapping, f"{Path(path).name} + {side.name}"


def cfg_text(preset) -> str:
    """A complete SCALE-Sim 3 `.cfg` for a preset's array, SRAMs and dataflow (CALC bandwidth);
    plain `scalesim -c` reads it."""
    if preset.engine is not None or any(not float(getattr(preset, f"{k}_sram_kb")).is_integer()
                                        for k in ("ifmap", "filter", "ofmap")):
        raise UserError(f"preset {preset.name} is an engine preset (tiled as its engine runs); a SCALE-Sim "
                        ".cfg describes a plain systolic array only")
    return "\n".join([
        "[general]", f"run_name = {preset.name}", "",
        "[architecture_presets]", f"ArrayHeight = {preset.array_rows}", f"ArrayWidth = {preset.array_cols}",
        f"IfmapSramSzkB = {int(preset.ifmap_sram_kb)}", f"FilterSramSzkB = {int(preset.filter_sram_kb)}",
        f"OfmapSramSzkB = {int(preset.ofmap_sram_kb)}", "IfmapOffset = 0", "FilterOffset = 10000000",
        "OfmapOffset = 20000000", f"Dataflow = {preset.dataflow}", "Bandwidth = 10", "ReadRequestBuffer = 32",
        "WriteRequestBuffer = 32", "",
        "[layout]", "IfmapCustomLayout = False", "IfmapSRAMBankBandwidth = 10", "IfmapSRAMBankNum = 10",
        "IfmapSRAMBankPort = 2", "FilterCustomLayout = False", "FilterSRAMBankBandwidth = 10",
        "FilterSRAMBankNum = 10", "FilterSRAMBankPort = 2", "",
        "[sparsity]", "SparsitySupport = false", "SparseRep = ellpack_block", "OptimizedMapping = false",
        "BlockSize = 8", "RandomNumberGeneratorSeed = 40", "",
        "[run_presets]", "InterfaceBandwidth = CALC", "UseRamulatorTrace = False", ""])


def topology_csv(layers) -> str:
    """SCALE-Sim's conv topology file for `layers`: (name, SimLayer, groups) triples; a grouped conv
    is `groups` rows (SCALE-Sim has no groups). Names are made safe for its parser (no commas;
    'DP' in a name would make SCALE-Sim treat the layer as depthwise)."""
    lines = [TOPOLOGY_HEADER]
    for name, layer, groups in layers:
        safe = name.replace(",", "_").replace("DP", "Dp")
        for g in range(groups):
            label = safe if groups == 1 else f"{safe}.g{g}"
            lines.append(f"{label}, {layer.ifmap_h}, {layer.ifmap_w}, {layer.kernel_h}, {layer.kernel_w}, "
                         f"{layer.channels}, {layer.filters}, {layer.stride},")
    return "\n".join(lines) + "\n"
