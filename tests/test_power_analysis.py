"""Energy integration against traces of known energy (noise, baseline drift, sample jitter).

Tolerance, derived per window of length T with sample spacing <= dt_max and noise sigma:
  * edges: a power step inside a sample interval is integrated with a linear ramp, error <= dP*dt/2
    per edge, so <= dP*dt_max for the window;
  * noise: the trapezoid of white noise has std ~ sigma*sqrt(T*dt_mean); the baseline estimate
    (mean of N_idle samples, applied over T) adds std sigma*T/sqrt(N_idle); we allow 5 std of each;
  * drift: linear, and the baseline is linear between idle windows, so its error is zero.
"""
import math

import numpy as np
import pandas as pd
import pytest

from ddi_hw.errors import UserError
from ddi_hw.power.analysis import integrate, summarize, window_energies
from ddi_hw.power.logger import HEADER
from ddi_hw.power.windows import WINDOW_HEADER


def _trace(rng, windows, rate=500.0, jitter=0.3, p0=4.0, drift=0.02, dp=1.5, sigma=0.05, t_end=6.0):
    dt = 1.0 / rate
    t = np.cumsum(dt * (1 + jitter * rng.uniform(-1, 1, int(t_end * rate))))
    active = np.zeros_like(t, dtype=bool)
    for a, b in windows:
        active |= (t >= a) & (t < b)
    p = p0 + drift * t + dp * active + rng.normal(0, sigma, len(t))
    df = pd.DataFrame({"host_wall_s": t + 1e9, "host_mono_s": t, "meter_t_s": t,
                       "volts": 12.0, "amps": p / 12.0, "watts": p})
    return df[HEADER], float(np.max(np.diff(t))), float(np.mean(np.diff(t)))


def _windows(runs, idles, n_inf=7):
    rows = [["idle", "idle", 0, 0, a, b, a + 1e9, b + 1e9] for a, b in idles]
    rows += [["run", f"cfg{i % 2}", i // 2, n_inf, a, b, a + 1e9, b + 1e9] for i, (a, b) in enumerate(runs)]
    return pd.DataFrame(rows, columns=WINDOW_HEADER).sort_values("start_mono_s")


def test_integrate_exact_on_piecewise_linear():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    p = np.array([0.0, 2.0, 2.0, 0.0])
    # by hand: from 0.5 (p=1) to 2.5 (p=1): 0.5*1.5 + 2 + 0.5*1.5 = 3.5
    assert integrate(t, p, 0.5, 2.5) == pytest.approx(3.5, abs=1e-12)


def test_energy_per_window_matches_truth_within_derived_tolerance():
    rng = np.random.default_rng(0)
    runs = [(1.0 + 1.1 * i, 1.8 + 1.1 * i + 0.05 * i) for i in range(4)]
    idles = [(0.1, 0.9), (5.4, 5.9)]
    dp, sigma, p0, drift = 1.5, 0.05, 4.0, 0.02
    power, dt_max, dt_mean = _trace(rng, runs, dp=dp, sigma=sigma, p0=p0, drift=drift)
    per = window_energies(power, _windows(runs, idles))
    assert (per["status"] == "ok").all() and len(per) == 4
    n_idle = int(((power.host_mono_s > 0.1) & (power.host_mono_s < 0.9)).sum())
    for (a, b), (_, r) in zip(runs, per.sort_values("start_s").iterrows()):
        T = b - a
        true_net = dp * T
        tol = dp * dt_max + 5 * sigma * math.sqrt(T * dt_mean) + 5 * sigma * T / math.sqrt(n_idle)
        assert tol < 0.05 * true_net  # the test can fail: the tolerance is tight
        assert abs(r["energy_net_j"] - true_net) <= tol
        assert r["energy_per_inference_j"] == pytest.approx(r["energy_net_j"] / 7)
        # gross energy includes the drifting baseline: integral of p0 + drift*t + dp
        true_gross = (p0 + dp) * T + drift * (b * b - a * a) / 2
        assert abs(r["energy_gross_j"] - true_gross) <= tol
        assert r["baseline_w"] == pytest.approx(p0 + drift * (a + b) / 2, abs=5 * sigma / math.sqrt(n_idle) + 1e-3)


def test_without_baseline_subtraction_drift_would_bias():
    """Guard that the drift in the trace is large enough to matter (so the test above means something)."""
    rng = np.random.default_rng(1)
    runs = [(1.0, 1.8), (4.0, 4.8)]
    power, _, _ = _trace(rng, runs, drift=0.3)
    per = window_energies(power, _windows(runs, [(0.1, 0.9), (5.4, 5.9)]))
    first_idle_only = per["baseline_w"].iloc[1] - per["baseline_w"].iloc[0]
    assert first_idle_only > 0.5  # baselines differ by drift*3 s = 0.9 W


def test_summary_t_interval_by_hand():
    per = pd.DataFrame({"config": ["a"] * 3, "status": "ok", "energy_per_inference_j": [1.0, 2.0, 3.0],
                        "gross_per_inference_j": [2.0] * 3, "baseline_w": [1.0] * 3,
                        "latency_per_inference_s": [0.1] * 3})
    s = summarize(per).iloc[0]
    # mean 2, sd 1, t(0.975, 2) = 4.302653; half = 4.302653 / sqrt(3)
    assert s["energy_per_inference_j"] == 2.0
    assert s["ci95_half_j"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)


def test_windows_outside_log_or_over_gaps_are_rejected_not_integrated():
    rng = np.random.default_rng(2)
    runs = [(1.0, 1.8), (2.5, 3.0), (5.8, 7.0)]
    power, _, _ = _trace(rng, runs)
    power = power[~((power.host_mono_s > 2.6) & (power.host_mono_s < 2.9))]  # a 0.3 s hole
    per = window_energies(power, _windows(runs, [(0.1, 0.9)]), max_gap_s=0.2)
    assert list(per.sort_values("start_s")["status"]) == ["ok", "gap in samples", "outside log"]


def test_no_idle_window_is_a_user_error():
    rng = np.random.default_rng(3)
    power, _, _ = _trace(rng, [(1.0, 2.0)])
    with pytest.raises(UserError, match="idle"):
        window_energies(power, _windows([(1.0, 2.0)], []))


def _stalled_log(rng, windows, dp=2.0, p0=3.0, reboot_at=None):
    """200 Hz samples; the meter's clock runs 80 ppm fast from its own epoch (and restarts from 0 at
    `reboot_at`); the host reads each 1-3 ms late, except for a 0.6 s stall of the reader at 3.0 s
    whose samples are all stamped when it wakes. Returns the log and the true host-clock times."""
    stall_s = 0.6
    true = np.arange(0, 8, 1 / 200) + 50.0  # host clock
    mt = 1000.0 + (true - 50.0) * (1 + 80e-6)
    if reboot_at is not None:
        mt = np.where(true - 50 >= reboot_at, (true - 50 - reboot_at) * (1 + 80e-6), mt)
    host = true + 0.001 + rng.exponential(0.002, len(true))
    stall = (true >= 53.0) & (true < 53.0 + stall_s)
    host[stall] = 53.0 + stall_s + 0.001
    active = np.zeros(len(true), bool)
    for a, b in windows:
        active |= (true >= a) & (true < b)
    p = p0 + dp * active
    df = pd.DataFrame({"host_wall_s": host + 1e9, "host_mono_s": host, "meter_t_s": mt,
                       "volts": 12.0, "amps": p / 12.0, "watts": p})
    return df[HEADER], true


@pytest.mark.parametrize("reboot_at", [None, 5.0])
def test_meter_clock_times_undo_the_readers_stalls(reboot_at):
    from ddi_hw.power.analysis import sample_times

    rng = np.random.default_rng(1)
    runs, idles = [(52.5, 53.3), (55.2, 55.8)], [(50.2, 52.3), (56.5, 57.9)]  # a run ends in the stall
    power, true = _stalled_log(rng, runs, reboot_at=reboot_at)
    t = sample_times(power)
    assert np.abs(t - (true + 0.001)).max() < 2e-4  # the minimum latency stays; stall, jitter, drift go
    assert (t <= power.host_mono_s.to_numpy()).all()  # never before the host saw it
    per = window_energies(power, _windows(runs, idles))
    assert np.allclose(per.energy_net_j, [2.0 * (b - a) for a, b in runs], atol=2.0 * 0.006)
    assert (per.status == "ok").all()
    # the same log stamped by the host only: the stall is a 0.6 s hole, and the window ending in it is lost
    host_only = window_energies(power.assign(meter_t_s=np.nan), _windows(runs, idles))
    assert list(host_only.status) == ["gap in samples", "ok"]


def test_samples_without_a_meter_clock_keep_their_host_stamp():
    from ddi_hw.power.analysis import sample_times

    power, _ = _stalled_log(np.random.default_rng(2), [])
    mt = power.meter_t_s.to_numpy().copy()
    mt[::3] = np.nan
    t = sample_times(power.assign(meter_t_s=mt))
    assert np.array_equal(t[::3], power.host_mono_s.to_numpy()[::3])
    assert np.array_equal(sample_times(power.assign(meter_t_s=np.nan)), power.host_mono_s.to_numpy())


def test_analyze_a_log_from_another_machine_on_the_wall_clock(tmp_path):
    """Logger on a workstation, windows on the board: their monotonic clocks share nothing, their
    (NTP-synced) wall clocks do. `--clock wall` matches them; the default refuses the mismatch."""
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    runs, idles = [(1.0, 1.8), (2.1, 2.9), (3.2, 4.0)], [(0.1, 0.9), (5.4, 5.9)]
    power, _, _ = _trace(rng, runs, dp=1.5, sigma=0.0, drift=0.0)
    power = power.assign(host_mono_s=power.host_mono_s + 7000.0)  # the workstation's uptime clock
    power.to_csv(tmp_path / "p.csv", index=False)
    _windows(runs, idles).to_csv(tmp_path / "w.csv", index=False)

    def analyze(*extra):
        return subprocess.run([sys.executable, "-m", "ddi_hw.cli", "power", "analyze", "p.csv", "w.csv",
                               "--out-dir", "out", *extra], cwd=tmp_path, capture_output=True, text=True)

    r = analyze("--clock", "wall")
    assert r.returncode == 0, r.stderr
    per = pd.read_csv(tmp_path / "out" / "energy_windows.csv")
    assert np.allclose(per.energy_net_j, [1.5 * (b - a) for a, b in runs], atol=1.5 * 0.004)
    r = analyze()
    assert r.returncode == 2 and "--clock wall" in r.stderr and "Traceback" not in r.stderr
