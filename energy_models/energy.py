"""Eq. 6 of the paper: access counts -> energy, plus the counts SCALE-Sim does not give.

    E_dynamic = sum_i #acc_i * e_i + #MAC * e_MAC      over DRAM, SRAM, array/NoC, RF
    E_static  = static power x cycles / clock          (reported separately)
    E_board   = board power x latency                  (PS, DDR background, regulators; presets
                with `board_power_w`), latency = cycles / clock + processor time (`proc_s`)

Register-file and array (NoC) accesses are derived from the dataflow and the MAC count, because
SCALE-Sim models neither (`rf_noc_accesses`). Pooling and residual adds are costed analytically
(`analytic_counts`). All numbers are simulated/modelled, never measured.
"""
from __future__ import annotations

import math

import numpy as np

from energy_models.scalesim_runner import COUNT_COLUMNS

ENERGY_COLUMNS = ("e_dram_pj", "e_sram_pj", "e_noc_pj", "e_rf_pj", "e_mac_pj", "e_dynamic_pj",
                  "e_static_pj", "e_board_pj", "energy_pj", "latency_s")


def rf_noc_accesses(counts: dict, dataflow: str) -> tuple[int, int]:
    """(register-file accesses, array/NoC hops) of a systolic conv/linear layer.

    Rule: every MAC reads its two operands from PE registers and updates its partial sum
    (read + write counted as one access): 3 per MAC. The stationary operand is also written into
    its PE register once per use from SRAM: ofmap outputs leave their accumulators (os), weights
    are loaded (ws), inputs are loaded (is). Every MAC receives its two moving operands from a
    neighbouring PE (os: ifmap + weight, ws: ifmap + psum, is: weight + psum): 2 hops per MAC.
    """
    macs = counts["macs"]
    fills = {"os": counts["sram_writes_ofmap"], "ws": counts["sram_reads_filter"],
             "is": counts["sram_reads_ifmap"]}[dataflow]
    return 3 * macs + fills, 2 * macs


def analytic_counts(spec, axis: str, active: int, array_cols: int) -> dict:
    """Counts of a pooling or elementwise-add layer with `active` channels, run on a vector unit
    of `array_cols` lanes (one op per lane per cycle): inputs read once from DRAM through SRAM,
    outputs written once; a pool reads each window element from SRAM, an add reads 2 inputs."""
    outs = spec.out_h * spec.out_w * active
    ops = spec.macs_at(active, active)
    if spec.kind == "pool":
        sram_in, dram_in = ops, spec.in_h * spec.in_w * active
    else:  # add
        sram_in, dram_in = 2 * outs, 2 * outs
    return dict(macs=ops, cycles=math.ceil(ops / array_cols), sram_reads_ifmap=sram_in,
                sram_reads_filter=0, sram_writes_ofmap=outs, dram_reads_ifmap=dram_in,
                dram_reads_filter=0, dram_writes_ofmap=outs)


def add_energy(df, preset, dataflow: str):
    """Add `rf_accesses`, `noc_accesses` and the Eq. 6 energy columns to a counts DataFrame."""
    simulated = df["source"].str.startswith("scalesim").to_numpy()
    on_array = df["source"].to_numpy() != "processor"  # processor rows: time only
    counts = {c: df[c].to_numpy(dtype=np.int64) for c in COUNT_COLUMNS}
    rf, noc = rf_noc_accesses(counts, dataflow)
    df["rf_accesses"] = np.where(simulated, rf, 0)
    df["noc_accesses"] = np.where(simulated, noc, 0)
    dram = df["dram_reads_ifmap"] + df["dram_reads_filter"] + df["dram_writes_ofmap"]
    sram = df["sram_reads_ifmap"] + df["sram_reads_filter"] + df["sram_writes_ofmap"]
    df["e_dram_pj"] = dram * preset.dram_pj
    df["e_sram_pj"] = sram * preset.sram_pj
    df["e_noc_pj"] = df["noc_accesses"] * preset.noc_pj
    df["e_rf_pj"] = df["rf_accesses"] * preset.rf_pj
    df["e_mac_pj"] = np.where(on_array, df["macs"] * preset.mac_pj, 0.0)
    df["e_dynamic_pj"] = (df["e_dram_pj"] + df["e_sram_pj"] + df["e_noc_pj"] + df["e_rf_pj"]
                          + df["e_mac_pj"])
    proc_s = df["proc_s"] if "proc_s" in df else 0.0
    df["latency_s"] = df["cycles"] / preset.clock_hz + proc_s
    df["e_static_pj"] = preset.static_power_w * df["cycles"] / preset.clock_hz * 1e12
    df["e_board_pj"] = getattr(preset, "board_power_w", 0.0) * df["latency_s"] * 1e12
    df["energy_pj"] = df["e_dynamic_pj"] + df["e_static_pj"] + df["e_board_pj"]
    return df
