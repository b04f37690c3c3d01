"""Calibration: fit Eq. 6's per-access energies and static power to measured energy.

Each measured configuration (a set of layers run at some channel counts) contributes one row:
its total access counts from the cost table and the energy measured per inference. The model is
linear and every coefficient is physically non-negative, so non-negative least squares is the
right tool:  E = e_dram*D + e_sram*S + e_noc*N + e_rf*R + e_mac*M + P_static * cycles / f_clk
+ P_board * (cycles / f_clk + proc_s), exactly energy_models' Eq. 6 (energy.add_energy), so the
calibrated preset reproduces the fit. P_board (PS, DDR background, regulators) is told apart from
the PL's static power only by processor time (`proc_s`, optional column, e.g. the gates on the
ARM): without it the two are one column and the board power is kept from the base preset.
Rows are weighted by 1/E (relative error) so that small configurations count as much as large
ones; columns are scaled to unit norm before solving so the pJ and W coefficients are comparable.
A coefficient whose column is (nearly) a combination of the others cannot be identified from
these measurements: it is reported, not silently trusted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ddi_hw.errors import UserError
from energy_models.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

COUNT_COLUMNS = ["dram_accesses", "sram_accesses", "noc_accesses", "rf_accesses", "macs", "cycles"]
MEASUREMENT_COLUMNS = ["config", *COUNT_COLUMNS, "energy_j"]  # plus optional "proc_s"
COEFFICIENTS = ["e_dram_pj", "e_sram_pj", "e_noc_pj", "e_rf_pj", "e_mac_pj", "static_w"]
BOARD = "board_w"  # fitted only when the measurements carry processor time (`proc_s`)


@dataclass
class Fit:
    coef: dict[str, float]
    std_err: dict[str, float]
    r2: float
    rel_err: "pd.Series"  # per configuration: (predicted - measured) / measured
    condition: float
    warnings: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)  # kept from the base preset (not identifiable)

    def summary(self):
        import pandas as pd

        return pd.DataFrame({"coefficient": list(self.coef), "value": list(self.coef.values()),
                             "std_err": [self.std_err[k] for k in self.coef]})


def config_counts(rows: pd.DataFrame) -> dict[str, float]:
    """Sum a cost-table slice (one row per executed layer at its active count) into counts."""
    need = ["macs", "cycles", "rf_accesses", "noc_accesses", "sram_reads_ifmap", "sram_reads_filter",
            "sram_writes_ofmap", "dram_reads_ifmap", "dram_reads_filter", "dram_writes_ofmap"]
    missing = [c for c in need if c not in rows.columns]
    if missing:
        raise UserError(f"cost table lacks columns {missing}; regenerate it with `ddi-hw profile`")
    s = rows[need].sum()
    extra = {"proc_s": float(rows["proc_s"].sum())} if "proc_s" in rows.columns else {}
    return {**extra, "dram_accesses": float(s.dram_reads_ifmap + s.dram_reads_filter + s.dram_writes_ofmap),
            "sram_accesses": float(s.sram_reads_ifmap + s.sram_reads_filter + s.sram_writes_ofmap),
            "noc_accesses": float(s.noc_accesses), "rf_accesses": float(s.rf_accesses), "macs": float(s.macs),
            "cycles": float(s.cycles)}


def read_measurements(path: Path) -> pd.DataFrame:
    from ddi_hw.validate import read_csv

    df = read_csv(path, MEASUREMENT_COLUMNS, "measurements file",
                  "one row per measured configuration: " + ", ".join(MEASUREMENT_COLUMNS),
                  numbers={**{c: ">=0" for c in COUNT_COLUMNS}, "proc_s": ">=0",
                           "energy_j": ">0"})  # baseline-subtracted J per inference
    if "proc_s" not in df.columns:
        df["proc_s"] = 0.0
    return df


def design(df: pd.DataFrame, clock_hz: float) -> np.ndarray:
    """Columns in the units of COEFFICIENTS: counts (x pJ) and seconds*1e12 (x W -> pJ)."""
    import numpy as np

    return np.column_stack([df.dram_accesses, df.sram_accesses, df.noc_accesses, df.rf_accesses, df.macs,
                            df.cycles / clock_hz * 1e12]).astype(float)


def board_column(df: pd.DataFrame, clock_hz: float) -> np.ndarray:
    """Inference time in ps (x W -> pJ): PL cycles plus processor time."""
    proc_s = df["proc_s"].to_numpy(float) if "proc_s" in df else 0.0
    return (df.cycles.to_numpy(float) / clock_hz + proc_s) * 1e12


# When two counts move together, the one earlier in this list is fixed at its base-preset value
# (energy_models derives NoC hops = 2 x MACs and RF accesses = 3 x MACs + fills from the MAC
# count, so those go first: with cost-table counts only their sum with e_mac is measurable).
# The board power goes before the PL static power: with little processor time they are collinear.
FIX_ORDER = ["e_noc_pj", "e_rf_pj", "e_mac_pj", BOARD, "static_w", "e_sram_pj", "e_dram_pj"]


def fit(df: pd.DataFrame, clock_hz: float, base: dict[str, float] | None = None,
        collinear_tol: float = 1e-3) -> Fit:
    """NNLS fit; coefficients the data cannot identify are fixed at `base` and reported."""
    import numpy as np
    import pandas as pd
    from scipy.optimize import nnls

    base = base or {}
    names = list(COEFFICIENTS)
    X = design(df, clock_hz)
    y = df["energy_j"].to_numpy(float) * 1e12  # pJ
    w = 1.0 / y  # relative error: weights from the measured energy
    warnings: list[str] = []
    board = board_column(df, clock_hz)
    if "proc_s" in df and (df["proc_s"] > 0).any():
        names.append(BOARD)  # processor time tells the board power from the PL's static power
        X = np.column_stack([X, board])
    elif base.get(BOARD, 0.0) > 0:  # one column with static_w: a known offset from the base preset
        y = y - base[BOARD] * board
        warnings.append(f"{BOARD}: no processor time (proc_s) in the measurements to tell it from "
                        f"static_w; kept at the base preset's {base[BOARD]:g} W")
    Xw, yw = X * w[:, None], y * w
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(Xw, axis=0)
    if not (np.isfinite(Xw).all() and np.isfinite(yw).all() and np.isfinite(norms).all()):
        raise UserError("counts or energies too large to fit in floating point; check the units "
                        "(counts per inference, energy_j in joules)")
    free = [j for j in range(len(names)) if norms[j] > 0]
    for j in range(len(names)):
        if norms[j] == 0:
            warnings.append(f"{names[j]}: zero in every configuration, not identifiable; "
                            "kept from the base preset")
    for name in FIX_ORDER:
        if name not in names:
            continue
        j = names.index(name)
        if j not in free or len(free) < 2:
            continue
        others = [k for k in free if k != j]
        A = Xw[:, others] / norms[others]
        col = Xw[:, j] / norms[j]
        resid = col - A @ np.linalg.lstsq(A, col, rcond=None)[0]
        if np.linalg.norm(resid) < collinear_tol:
            free.remove(j)
            warnings.append(f"{name}: (nearly) a combination of the other counts in these "
                            "configurations, not identifiable; kept from the base preset "
                            "(measure configurations that vary it independently)")
    fixed = [j for j in range(len(names)) if j not in free]
    if not free:
        raise UserError("every count column is zero in every configuration: nothing to fit; measure "
                        "configurations that run layers (non-zero counts)")
    if np.linalg.matrix_rank(Xw[:, free] / norms[free]) < len(free):  # never hand nnls a singular system
        raise UserError(f"the measurements cannot separate the {len(free)} coefficients "
                        f"({', '.join(names[j] for j in free)}): the system is rank-deficient; "
                        "measure configurations that vary the counts independently")
    beta = np.array([float(base.get(names[j], 0.0)) for j in range(len(names))])
    beta[free] = 0.0
    y_rest = yw - Xw[:, fixed] @ beta[fixed] if fixed else yw
    Xs = Xw[:, free] / norms[free]
    sol, _ = nnls(Xs, y_rest)
    beta[free] = sol / norms[free]
    sv = np.linalg.svd(Xs, compute_uv=False)
    condition = float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf")
    if len(df) <= len(free):
        warnings.append(f"{len(df)} configurations for {len(free)} free coefficients: no residual "
                        "left to judge the fit; measure more configurations")
    for j in free:
        if beta[j] == 0.0:
            warnings.append(f"{names[j]}: fitted at the zero bound (the data prefer a "
                            "negative value; check the baseline subtraction)")
    # standard errors of free, non-zero coefficients from the weighted least-squares covariance
    se = np.full(len(names), np.nan)
    active = [j for j in free if beta[j] > 0]
    dof = len(y) - len(active)
    if dof > 0 and active:
        resid = yw - Xw @ beta
        s2 = float(resid @ resid) / dof
        cov = s2 * np.linalg.pinv(Xw[:, active].T @ Xw[:, active])
        se[active] = np.sqrt(np.clip(np.diag(cov), 0, None))
    pred = X @ beta + (0.0 if BOARD in names else base.get(BOARD, 0.0) * board)
    y = df["energy_j"].to_numpy(float) * 1e12
    r2 = 1.0 - float(np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)) if len(y) > 1 else float("nan")
    rel = pd.Series((pred - y) / y, index=df["config"].astype(str), name="rel_err")
    return Fit(dict(zip(names, beta.tolist())), dict(zip(names, se.tolist())),
               r2, rel, condition, warnings, [names[j] for j in fixed])


# calibrated coefficient -> (preset YAML key, section or None for top level)
PRESET_KEYS = {"e_dram_pj": ("dram_pj", "energy"), "e_sram_pj": ("sram_pj", "energy"),
               "e_noc_pj": ("noc_pj", "energy"),
               "e_rf_pj": ("rf_pj", "energy"), "e_mac_pj": ("mac_pj", "energy"),
               "static_w": ("static_power_w", None), "board_w": ("board_power_w", None)}
# the preset loader wants per-access energies > 0; a coefficient fitted at the zero bound is
# written as this floor (effectively zero) and said so in the file
ENERGY_FLOOR_PJ = 1e-9


def base_coefficients(preset) -> dict[str, float]:
    return {c: float(getattr(preset, key)) for c, (key, _) in PRESET_KEYS.items()}


def calibrated_preset_text(base_text: str, base_name: str, result: Fit, source: str) -> str:
    """The base preset's YAML with the fitted fields replaced in place (comments kept) and a
    provenance header, so the file still cites where every unfitted number comes from."""
    import re
    from datetime import datetime, timezone

    import yaml

    text = base_text
    for coef, (key, section) in PRESET_KEYS.items():
        if coef in result.fixed or coef not in result.coef:
            continue
        value = result.coef[coef]
        note = "CALIBRATED"
        if section is not None and value <= 0:
            value, note = ENERGY_FLOOR_PJ, "CALIBRATED: fitted at zero bound, floor for the loader"
        indent = r"[ \t]+" if section else ""
        pattern = re.compile(rf"^({indent}{key}:)[ \t]*([^#\n]*?)[ \t]*(#.*)?$", re.M)
        if len(pattern.findall(text)) != 1:
            raise UserError(f"base preset {base_name}: cannot find a single '{key}:' line to "
                            "replace; calibrate against a preset in the shipped layout")
        literal = yaml.safe_dump(float(f"{value:.6g}")).split("\n")[0]  # YAML 1.1-safe float
        text = pattern.sub(lambda m: f"{m.group(1)} {literal}    # {note} (base {m.group(2)})"
                           + (f"; base note: {m.group(3)[1:].strip()}" if m.group(3) else ""),
                           text, count=1)
    text = re.sub(r"^name:.*$", f"name: {base_name}-calibrated", text, count=1, flags=re.M)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fixed = ", ".join(result.fixed) or "none"
    header = (f"# CALIBRATED by `ddi-hw calibrate` on {when} from {source}\n"
              f"# base preset: {base_name}; fit: NNLS, R^2 = {result.r2:.4f}, "
              f"max |relative error| = {result.rel_err.abs().max():.3%}\n"
              f"# kept from the base preset (not identifiable from these measurements): {fixed}\n"
              "# MEASURED coefficients below are marked CALIBRATED; everything else is the base preset.\n")
    return header + text


def calibrate_command(
    measurements: Path = typer.Argument(..., help="CSV: config, dram_accesses, sram_accesses, noc_accesses, "
                                        "rf_accesses, macs, cycles, energy_j (J per inference, baseline-subtracted)"),
    hardware: str = typer.Option("zedboard", "--hardware", help="base preset name or YAML file"),
    out: Path = typer.Option(Path("calibrated_preset.yaml"), "--out", help="calibrated preset to write"),
) -> None:
    """Fit the preset's per-access energies and static power to measured energy (NNLS).

    Writes a calibrated preset that `profile --hardware OUT` and `train --hardware OUT` accept,
    plus OUT.fit.csv with the coefficients and their standard errors.
    """
    from rich.console import Console
    from rich.table import Table

    from ddi_hw.validate import output_file
    from energy_models.presets import _read, load_preset

    out = output_file(out, "--out")
    df = read_measurements(measurements)
    preset = load_preset(hardware)
    base = base_coefficients(preset)
    result = fit(df, preset.clock_hz, base)
    console = Console()
    table = Table(title=f"calibration of {preset.name} on {len(df)} configurations "
                        f"(R^2 = {result.r2:.4f}, condition {result.condition:.3g})")
    for col in ("coefficient", "base", "fitted", "std err", "status"):
        table.add_column(col)
    for c in result.coef:
        status = "kept (not identifiable)" if c in result.fixed else "MEASURED fit"
        table.add_row(c, f"{base[c]:.4g}", f"{result.coef[c]:.4g}", f"{result.std_err[c]:.3g}", status)
    console.print(table)
    per = Table(title="per configuration")
    per.add_column("config")
    per.add_column("relative error")
    for name, err in result.rel_err.items():
        per.add_row(str(name), f"{err:+.2%}")
    console.print(per)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    base_text, _ = _read(str(hardware))
    text = calibrated_preset_text(base_text, preset.name, result, Path(measurements).name)
    out = Path(out)
    with atomic_path(out, suffix=".yaml") as tmp:
        tmp.write_text(text)
        load_preset(tmp)  # never leave a preset behind that the loader would refuse
    fit_csv = out.with_suffix(".fit.csv")
    rows = result.summary().assign(base=[base[c] for c in result.coef],
                                   kept_from_base=[c in result.fixed for c in result.coef])
    atomic_write_text(fit_csv, rows.to_csv(index=False))
    typer.echo(f"wrote {out} and {fit_csv}")


def counts_from_runs(cost_table, bundle, results) -> dict[str, float]:
    """Mean per-image access counts of what the images really ran (`executed_rows`), summed from the
    cost table (`energy_models.profile_model` / `ddi-hw profile` CSV). One measurement row's counts."""
    import pandas as pd

    table = cost_table.set_index(["layer", "axis", "active"]).sort_index()
    blocks = table_blocks(cost_table)  # once per table, not once per image
    keys = [k for r in results for k in executed_rows(cost_table, bundle, r, blocks)]
    missing = sorted({k for k in keys if k not in table.index})
    if missing:
        raise UserError(f"cost table has no row for {missing[0]} (and {len(missing) - 1} more): profile "
                        "the same architecture the bundle was exported from")
    rows = table.loc[pd.MultiIndex.from_tuples(keys, names=table.index.names)].reset_index()
    total = config_counts(rows)
    return {k: v / max(len(results), 1) for k, v in total.items()}


def table_blocks(cost_table):
    """The table's full-width rows by layer, and each block's rows in table order: what
    `executed_rows` walks for every image."""
    need = [c for c in ("block", "role", "gate_kind", "out_gate", "in_gate", "kind", "in_ch", "out_h", "out_w",
                        "kernel_h") if c not in cost_table.columns]
    if need:
        raise UserError(f"cost table lacks columns {need}; regenerate it with `ddi-hw profile`")
    fused = cost_table.source.astype(str).str.startswith("fused into") if "source" in cost_table else None
    if fused is not None and (fused & (cost_table.kind == "pool")).any() and not (cost_table.kind == "sums").any():
        raise UserError("cost table charges pooled sums to the gates that read them (no `.sums` rows, from an "
                        "older `ddi-hw profile`); profile the model again with this version")
    dense = cost_table[cost_table.axis == "out"].sort_values("active").groupby("layer", sort=False).last()
    by_block: dict[str, list] = {}
    for layer, row in dense.iterrows():
        by_block.setdefault(str(row.block), []).append((layer, row))
    return dense, by_block


def executed_rows(cost_table, bundle, result, blocks=None) -> list[tuple[str, str, int]]:
    """(layer, axis, active) of every cost-table row one image ran (`result`: the runner's
    `ImageResult`), replayed from the bundle program and the image's decisions. Every row belongs to
    one step of the program by its `block` column, grouped as the model's cost plan groups them
    (`ddi_hw.models.base.CostPlan`): the stem, transitions and head whenever reached; a block's layer
    gate whenever the block is reached (its pool's read of the pooled sums or the map, embedding, LSTM
    step, projection on the ARM); the rest of a block only if it ran -- its channel gate (engine convs,
    pooled sums, FC on the ARM), its convs at the active channels of their gated axis, the rows fused
    into them (residual add, the `.sums` a conv writes) -- and only if it was skipped, its `.skip_copy`
    (a DenseNet layer's copy of the previous layer's features);
    an exit branch's rows (one-pass max pool and FC on the ARM, its convs, the pooled sums) when the
    branch ran (`exits_run`: under a budget, every fallback it ran); nothing after the exit the image stopped at,
    and of the block a budget stopped it in (`stopped_block`) only the gates that ran."""
    from ddi_hw.models.gates import GATE_KINDS

    dense, by_block = blocks if blocks is not None else table_blocks(cost_table)

    def block_of(layer: str) -> str:
        if layer not in dense.index:
            raise UserError(f"cost table has no row for {layer}: profile the same architecture the bundle "
                            "was exported from")
        return str(dense.block[layer])

    def given(v) -> bool:
        return isinstance(v, str) and v not in ("", "nan", "None")

    out, seen = [], set()

    def run(block: str, ran: bool = True, channel_gate: bool | None = None) -> None:
        """A block's rows: all if it ran; its layer gate only if skipped; its gates only (the channel
        gate if `channel_gate`) if a budget stopped the image in it (`channel_gate` not None)."""
        if block in seen:
            return
        seen.add(block)
        for layer, row in by_block.get(block, ()):
            if row.kind == "copy":  # paid only by a skip
                if not ran:
                    out.append((layer, "out", int(row.active)))
                continue
            if row.kind == "sums":  # paid with the launch that writes them: a channel gate's conv or the
                by_gate = dense.role.get(row.fused_into) == "gate"  # block's own convs
                if ran and (channel_gate is None or (by_gate and channel_gate)):
                    out.append((layer, "out", int(row.active)))
                continue
            if row.role == "gate":
                kind = GATE_KINDS.get(str(row.gate_kind))
                if kind is None:
                    raise UserError(f"cost table row {layer!r} is a gate of unknown kind {row.gate_kind!r}; "
                                    "profile this model again")
                if kind.role == "channel" and not (ran if channel_gate is None else channel_gate):
                    continue
                out.append((layer, "out", int(row.active)))
            elif channel_gate is not None or not ran:
                continue
            elif given(row.out_gate) and row.out_gate in result.channel_masks:
                out.append((layer, "out", int(result.channel_masks[row.out_gate].sum())))
            elif given(row.in_gate) and row.in_gate in result.channel_masks:
                out.append((layer, "in", int(result.channel_masks[row.in_gate].sum())))
            else:
                out.append((layer, "out", int(row.active)))

    prog, layers = bundle.program, bundle.layers
    i, block = 0, 0
    while i < len(prog):
        st = prog[i]
        if st["op"] == "block":
            first = next(s for s in prog[i + 1:st["end"]] if s["op"] == "conv")
            if block == getattr(result, "stopped_block", -1):
                run(block_of(layers[first["layer"]].name), channel_gate=result.stopped_after_channel_gate)
                break
            if block >= len(result.block_run):
                break
            name = block_of(layers[first["layer"]].name)
            if st.get("skip_from") and not result.block_run[block] and \
                    not any(row.kind == "copy" for _, row in by_block.get(name, ())):
                raise UserError(f"cost table has no skip-copy row for {name} (from an older `ddi-hw profile`); "
                                "profile the model again with this version")
            run(name, bool(result.block_run[block]))
            block += 1
            if not result.block_run[block - 1]:
                i = st["end"]
                continue
        elif st["op"] == "conv":  # stem, transitions (their pool with them): fixed
            run(block_of(layers[st["layer"]].name))
        elif st["op"] == "head":
            run(block_of(st["prefix"]))
        elif st["op"] == "exit":
            if st["index"] in result.exits_run:
                _check_exit_pool(cost_table, st)
                run(block_of(layers[st["layer"]].name))
            if st["index"] == result.stopped_at:
                break
        i += 1
    return out


def _check_exit_pool(cost_table, step) -> None:
    """An exit's max pool runs as one pass (the bundle step's window): a table that prices it
    otherwise (e.g. as 2x2 passes, from before bundle/5) is refused."""
    if step["pool"] == 1:
        return
    rows = cost_table[(cost_table.block == step["prefix"]) & (cost_table.kind == "pool")
                      & (cost_table.out_h * cost_table.out_w > 1)]
    names = sorted(set(rows.layer))
    if len(names) != 1 or set(rows.kernel_h) != {step["pool"]}:
        raise UserError(f"cost table prices {step['prefix']}'s max pool as {names or 'nothing'} (windows "
                        f"{sorted(set(rows.kernel_h))}), the bundle runs one {step['pool']}x{step['pool']} pass: "
                        "profile the same model the bundle was exported from with this version of `ddi-hw profile`")
