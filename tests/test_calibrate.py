"""Calibration recovers known Eq. 6 coefficients from synthetic measurements (+ noise), flags what
the measurements cannot identify, and writes a preset the energy_models loader accepts."""
import numpy as np
import pandas as pd
import pytest
import yaml

from ddi_hw.calibrate import COEFFICIENTS, base_coefficients, calibrate_command, config_counts, fit, read_measurements
from ddi_hw.errors import UserError
from energy_models.presets import load_preset

TRUE = {"e_dram_pj": 900.0, "e_sram_pj": 11.0, "e_noc_pj": 1.7, "e_rf_pj": 0.8, "e_mac_pj": 4.5,
        "static_w": 0.35}
CLOCK = 100e6


def _measurements(rng, n=60, noise=0.005, rf_per_mac=None):
    macs = rng.uniform(1e7, 6e7, n)
    df = pd.DataFrame({
        "config": [f"c{i}" for i in range(n)],
        "dram_accesses": rng.uniform(1e5, 1e6, n),
        "sram_accesses": rng.uniform(1e6, 1e7, n),
        "noc_accesses": macs * 2 if rf_per_mac else rng.uniform(2e7, 1e8, n),
        "rf_accesses": macs * rf_per_mac if rf_per_mac else rng.uniform(1e7, 2e8, n),
        "macs": macs,
        "cycles": macs / 128 * rng.uniform(1.0, 3.0, n),
    })
    e_pj = (TRUE["e_dram_pj"] * df.dram_accesses + TRUE["e_sram_pj"] * df.sram_accesses
            + TRUE["e_noc_pj"] * df.noc_accesses
            + TRUE["e_rf_pj"] * df.rf_accesses + TRUE["e_mac_pj"] * df.macs
            + TRUE["static_w"] * df.cycles / CLOCK * 1e12)
    df["energy_true_j"] = e_pj * 1e-12
    df["energy_j"] = df.energy_true_j * (1 + rng.normal(0, noise, n))
    return df


def test_recovers_known_coefficients_within_their_standard_errors():
    rng = np.random.default_rng(0)
    df = _measurements(rng)
    res = fit(df, CLOCK)
    assert not res.fixed and not res.warnings
    for c in COEFFICIENTS:
        se = res.std_err[c]
        assert abs(res.coef[c] - TRUE[c]) <= 4 * se, (c, res.coef[c], TRUE[c], se)
    # and the dominant terms are pinned down tightly (so the check above is not vacuous)
    for c in ("e_dram_pj", "e_mac_pj", "static_w", "e_sram_pj"):
        assert res.std_err[c] < 0.1 * TRUE[c]
        assert res.coef[c] == pytest.approx(TRUE[c], rel=0.15)
    # fit quality by hand
    pred = (df[["dram_accesses", "sram_accesses", "noc_accesses", "rf_accesses", "macs"]].to_numpy()
            @ np.array([res.coef[c] for c in COEFFICIENTS[:5]])
            + res.coef["static_w"] * df.cycles.to_numpy() / CLOCK * 1e12) * 1e-12
    y = df.energy_j.to_numpy()
    assert res.r2 == pytest.approx(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum(), rel=1e-9)
    assert np.allclose(res.rel_err.to_numpy(), (pred - y) / y)
    assert res.rel_err.abs().max() < 4 * 0.005


def test_noise_free_fit_is_exact():
    rng = np.random.default_rng(1)
    df = _measurements(rng, n=12, noise=0.0)
    res = fit(df, CLOCK)
    for c in COEFFICIENTS:
        assert res.coef[c] == pytest.approx(TRUE[c], rel=1e-6)


def test_collinear_rf_and_noc_are_kept_from_base_and_reported():
    rng = np.random.default_rng(2)
    df = _measurements(rng, rf_per_mac=3.0, noise=0.0)  # RF and NoC follow MACs by a fixed rule
    base = {"e_rf_pj": TRUE["e_rf_pj"], "e_noc_pj": TRUE["e_noc_pj"], "e_mac_pj": 1.0}
    res = fit(df, CLOCK, base)
    assert res.fixed == ["e_noc_pj", "e_rf_pj"]
    assert any("e_rf_pj" in w and "not identifiable" in w for w in res.warnings)
    assert res.coef["e_rf_pj"] == TRUE["e_rf_pj"] and res.coef["e_noc_pj"] == TRUE["e_noc_pj"]
    assert res.coef["e_mac_pj"] == pytest.approx(TRUE["e_mac_pj"], rel=1e-6)


def test_too_few_configurations_warns():
    rng = np.random.default_rng(3)
    res = fit(_measurements(rng, n=4, noise=0.0), CLOCK)
    assert any("configurations for" in w for w in res.warnings)


def test_config_counts_sums_a_cost_table_slice():
    rows = pd.DataFrame({"macs": [10, 20], "cycles": [5, 7], "rf_accesses": [30, 60], "noc_accesses": [20, 40],
                         "sram_reads_ifmap": [1, 2], "sram_reads_filter": [3, 4], "sram_writes_ofmap": [5, 6],
                         "dram_reads_ifmap": [7, 8], "dram_reads_filter": [9, 10], "dram_writes_ofmap": [11, 12]})
    assert config_counts(rows) == {"dram_accesses": 57.0, "sram_accesses": 21.0, "noc_accesses": 60.0,
                                   "rf_accesses": 90.0, "macs": 30.0, "cycles": 12.0}


def test_cli_writes_a_loadable_calibrated_preset(tmp_path, capsys):
    rng = np.random.default_rng(4)
    df = _measurements(rng, n=30, noise=0.002)
    src = tmp_path / "meas.csv"
    df.drop(columns=["energy_true_j"]).to_csv(src, index=False)
    out = tmp_path / "my_preset.yaml"
    # a user preset file copied from the shipped zedboard one (the `--hardware FILE` path)
    from importlib import resources
    shipped = (resources.files("energy_models") / "presets" / "zedboard.yaml").read_text()
    board = tmp_path / "board.yaml"
    # these synthetic energies have no board-level term: a base preset without one
    board.write_text(shipped.replace("\nboard_power_w: 0.75", "\nboard_power_w: 0"))
    calibrate_command(src, hardware=str(board), out=out)
    text = out.read_text()
    assert text.startswith("# CALIBRATED by `ddi-hw calibrate`")
    assert "Malladi" in text  # the base preset's citations survive
    p = load_preset(out)
    base = load_preset(board)
    res = fit(read_measurements(src), base.clock_hz, base_coefficients(base))
    assert p.dram_pj == pytest.approx(res.coef["e_dram_pj"], rel=1e-5)
    assert p.mac_pj == pytest.approx(res.coef["e_mac_pj"], rel=1e-5)
    assert p.static_power_w == pytest.approx(res.coef["static_w"], rel=1e-5)
    assert p.noc_pj == pytest.approx(res.coef["e_noc_pj"], rel=1e-5)
    assert p.array_rows == base.array_rows and p.ifmap_sram_kb == base.ifmap_sram_kb  # untouched
    assert p.name == "zedboard-calibrated"
    assert yaml.safe_load(text)["energy"]["sram_pj"] == pytest.approx(TRUE["e_sram_pj"], rel=0.1)
    assert (tmp_path / "my_preset.fit.csv").exists()


def test_bad_measurements_are_user_errors(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("config,macs,energy_j\na,1,1\n")
    with pytest.raises(UserError, match="lacks columns"):
        read_measurements(p)
    p.write_text("config,dram_accesses,sram_accesses,noc_accesses,rf_accesses,macs,cycles,energy_j\na,1,1,1,1,x,1,1\n")
    with pytest.raises(UserError, match="non-negative"):
        read_measurements(p)
    with pytest.raises(UserError, match="not found"):
        read_measurements(tmp_path / "nope.csv")


def test_calibrated_preset_reproduces_the_fit_through_energy_models_eq6(tmp_path):
    """Counts made by energy_models' own rules (RF, NoC from MACs), energies from its Eq. 6 on a
    'true' preset + noise; after calibration, Eq. 6 on the written preset gives the fit's numbers."""
    from dataclasses import replace

    from energy_models.energy import add_energy

    rng = np.random.default_rng(5)
    from importlib import resources
    shipped = (resources.files("energy_models") / "presets" / "zedboard.yaml").read_text()
    board = tmp_path / "board.yaml"
    board.write_text(shipped)
    base = load_preset(board)
    true = replace(base, dram_pj=700.0, sram_pj=9.0, mac_pj=5.0, static_power_w=0.4)
    n_cfg, layers = 25, 6
    raw = pd.DataFrame({
        "config": np.repeat([f"cfg{i}" for i in range(n_cfg)], layers), "source": "scalesim",
        "macs": rng.integers(10**5, 10**7, n_cfg * layers),
        "sram_reads_ifmap": rng.integers(10**4, 10**6, n_cfg * layers),
        "sram_reads_filter": rng.integers(10**4, 10**6, n_cfg * layers),
        "sram_writes_ofmap": rng.integers(10**3, 10**5, n_cfg * layers),
        "dram_reads_ifmap": rng.integers(10**3, 10**5, n_cfg * layers),
        "dram_reads_filter": rng.integers(10**3, 10**5, n_cfg * layers),
        "dram_writes_ofmap": rng.integers(10**3, 10**5, n_cfg * layers)})
    raw["cycles"] = (raw.macs / 128 * rng.uniform(1, 3, len(raw))).astype(np.int64)
    tab = add_energy(raw.copy(), true, "os")
    meas = pd.DataFrame([{"config": c, **config_counts(g),
                          "energy_j": g.energy_pj.sum() * 1e-12 * (1 + rng.normal(0, 0.002))}
                         for c, g in tab.groupby("config")])
    src = tmp_path / "meas.csv"
    meas.to_csv(src, index=False)
    out = tmp_path / "cal.yaml"
    calibrate_command(src, hardware=str(board), out=out)
    cal = load_preset(out)
    res = fit(read_measurements(src), base.clock_hz, base_coefficients(base))
    again = add_energy(raw.copy(), cal, "os").groupby("config").energy_pj.sum()
    design_pred = meas.set_index("config").energy_j * (1 + res.rel_err)
    assert np.allclose(again.loc[design_pred.index] * 1e-12, design_pred, rtol=1e-5)
    # and the fitted coefficients are recovered from energy_models' own numbers within 4 standard
    # errors; the dominant ones (DRAM, static) tightly
    for coef, field, value in (("e_dram_pj", "dram_pj", 700.0), ("e_sram_pj", "sram_pj", 9.0),
                               ("e_mac_pj", "mac_pj", 5.0), ("static_w", "static_power_w", 0.4)):
        assert abs(getattr(cal, field) - value) <= 4 * res.std_err[coef], (coef, getattr(cal, field))
    assert res.std_err["e_dram_pj"] < 0.05 * 700 and res.std_err["static_w"] < 0.05 * 0.4
