"""Energy per inference from a power log and its inference windows.

For every run window: baseline = idle power measured in the nearest idle windows before and
after, linear in time between them (this removes slow drift of the board's idle power); energy
= trapezoid of (P - baseline) over the window on the real sample times, with P interpolated at
the exact window edges. Repeats of one configuration give a mean and a t-distribution
confidence interval. The baseline is also reported so gross (wall-socket) energy is available.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ddi_hw.errors import UserError
from ddi_hw.power.logger import HEADER
from ddi_hw.power.windows import WINDOW_HEADER


def read_power(path: Path) -> tuple[pd.DataFrame, int]:
    """Samples sorted by time, and the number of unreadable rows (e.g. cut by a crash, or a
    byte the serial line garbled: such a row is counted, never fatal)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"power log {path} not found: run `ddi-hw power log ... --out {path}`")
    if not path.is_file():
        raise UserError(f"power log {path} is not a file; give the CSV written by `ddi-hw power log`")
    try:
        df = pd.read_csv(path, dtype=str, on_bad_lines="skip", engine="c", encoding="utf-8",
                         encoding_errors="replace")
    except pd.errors.EmptyDataError:
        raise UserError(f"power log {path} is empty; record one with `ddi-hw power log`") from None
    if list(df.columns) != HEADER:
        raise UserError(f"{path} is not a power log (columns {list(df.columns)[:6]})")
    with open(path, "rb") as f:
        n_lines = sum(1 for line in f if line.strip()) - 1
    for col in HEADER:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    good = df.dropna(subset=["host_wall_s", "host_mono_s", "watts"])
    good = good[np.isfinite(good["watts"]) & np.isfinite(good["host_mono_s"]) & np.isfinite(good["host_wall_s"])]
    good = good.sort_values("host_mono_s").reset_index(drop=True)
    return good, n_lines - len(good)


def read_windows(path: Path) -> pd.DataFrame:
    from ddi_hw.validate import read_csv

    path = Path(path)
    df = read_csv(path, WINDOW_HEADER, "windows file",
                  "the board driver writes it while running (ddi_hw.power.windows)",
                  numbers={**{c: "finite" for c in WINDOW_HEADER[4:]}, "n_inferences": "int>=0"})
    if (df["end_mono_s"] < df["start_mono_s"]).any():
        raise UserError(f"{path} has windows that end before they start; re-record them")
    bad = ~df["kind"].isin(["run", "idle"])
    if bad.any():
        raise UserError(f"windows file {path} row {int(bad.idxmax()) + 2}: kind {df['kind'][bad].iloc[0]!r}; "
                        "expected run or idle")
    return df.sort_values("start_mono_s").reset_index(drop=True)


def sample_times(power: pd.DataFrame, host_col: str = "host_mono_s", bin_s: float = 1.0,
                 jump_s: float = 1.0) -> np.ndarray:
    """When each sample was taken, on the host clock `host_col`. The host stamps a sample when it
    reads it, which a busy reader delays by up to a whole batch; a meter that stamps its own samples
    (meter_t_s) has no such delay. So, per stretch of steady meter clock (split where it steps back
    or disagrees with the host by more than `jump_s`), time = meter_t * (1 + drift) + offset, with the
    offset from the fastest-arriving sample (like NTP's minimum-delay filter: latency is never
    negative, so every time stays <= its host stamp) and the drift fitted to the per-`bin_s` fastest
    samples. Samples without a meter time keep their host stamp."""
    host = power[host_col].to_numpy(float)
    mt = power["meter_t_s"].to_numpy(float) if "meter_t_s" in power else np.full(len(host), np.nan)
    t = host.copy()
    ok = np.isfinite(mt)
    idx = np.flatnonzero(ok)
    if len(idx) < 2:
        return t
    dm, dh = np.diff(mt[idx]), np.diff(host[idx])
    cuts = np.flatnonzero((dm <= 0) | (np.abs(dm - dh) > jump_s) | (np.diff(idx) > 1)) + 1
    for seg in np.split(idx, cuts):
        m, d = mt[seg], host[seg] - mt[seg]  # d = offset + drift * m + latency
        drift = 0.0
        bins = np.floor((m - m[0]) / bin_s)
        if bins[-1] >= 2:  # a drift needs a few seconds of samples to be seen
            first = np.r_[0, np.flatnonzero(np.diff(bins)) + 1]
            fastest = [a + int(np.argmin(d[a:b])) for a, b in zip(first, np.r_[first[1:], len(seg)])]
            drift = float(np.polyfit(m[fastest], d[fastest], 1)[0])
        t[seg] = np.minimum(m + drift * m + float(np.min(d - drift * m)), host[seg])  # exact: no rounding up
    return t


def integrate(t: np.ndarray, p: np.ndarray, a: float, b: float) -> float:
    """Trapezoid of p(t) over [a, b], with p linearly interpolated at the edges."""
    inside = (t > a) & (t < b)
    tt = np.concatenate([[a], t[inside], [b]])
    pp = np.concatenate([[np.interp(a, t, p)], p[inside], [np.interp(b, t, p)]])
    return float(np.trapezoid(pp, tt))


def _max_dt(t: np.ndarray, a: float, b: float) -> float:
    lo = max(np.searchsorted(t, a, side="right") - 1, 0)
    hi = min(np.searchsorted(t, b, side="left"), len(t) - 1)
    seg = t[lo:hi + 1]
    return float(np.max(np.diff(seg))) if len(seg) > 1 else float("inf")


def window_energies(power: pd.DataFrame, windows: pd.DataFrame, time_col: str = "host_mono_s",
                    max_gap_s: float = 0.5) -> pd.DataFrame:
    """One row per run window: gross and baseline-subtracted energy, and per inference, on the
    samples' own times (`sample_times`) rather than the moments the host read them."""
    if power.empty:
        raise UserError("the power log has no readable samples")
    t, p = sample_times(power, time_col), power["watts"].to_numpy(float)
    order = np.argsort(t, kind="stable")
    t, p = t[order], p[order]
    base = time_col.replace("host_", "start_")  # host_mono_s -> start_mono_s, host_wall_s -> start_wall_s
    end = base.replace("start", "end")
    if not ((windows[end] >= t[0]) & (windows[base] <= t[-1])).any():
        hint = ("if the log and the windows come from different machines, use --clock wall"
                if time_col == "host_mono_s" else "check that the log and the windows are from one session")
        raise UserError(f"no window lies within the power log's time span ({time_col}); {hint}")
    idle = windows[windows["kind"] == "idle"]
    idle_pts = [((r[base] + r[end]) / 2, integrate(t, p, r[base], r[end]) / (r[end] - r[base]))
                for _, r in idle.iterrows()
                if r[base] >= t[0] and r[end] <= t[-1] and r[end] > r[base]]
    if not idle_pts:
        raise UserError("no idle window inside the power log: record idle time before and after runs")
    idle_t = np.array([x for x, _ in idle_pts])
    idle_p = np.array([y for _, y in idle_pts])
    rows = []
    for _, r in windows[windows["kind"] == "run"].iterrows():
        a, b = float(r[base]), float(r[end])
        row = {k: r[k] for k in ("config", "repeat", "n_inferences")}
        row.update(start_s=a, end_s=b, duration_s=b - a)
        status = "ok"
        if a < t[0] or b > t[-1]:
            status = "outside log"
        elif _max_dt(t, a, b) > max_gap_s:
            status = "gap in samples"
        before, after = idle_t[idle_t <= a], idle_t[idle_t >= b]
        if status == "ok" and len(before) == 0 and len(after) == 0:
            status = "no idle baseline"
        if status != "ok":
            rows.append({**row, "status": status})
            continue
        pts_t = [before.max()] if len(before) else []
        pts_t += [after.min()] if len(after) else []
        pts_p = [idle_p[idle_t == x][0] for x in pts_t]
        mid = (a + b) / 2
        baseline = float(np.interp(mid, pts_t, pts_p)) if len(pts_t) == 2 else float(pts_p[0])
        gross = integrate(t, p, a, b)
        net = gross - baseline * (b - a)  # the baseline is linear, so its mean is its midpoint
        n = max(int(r["n_inferences"]), 1)
        rows.append({**row, "status": status,
                     "n_samples": int(((t >= a) & (t <= b)).sum()),
                     "mean_w": gross / (b - a), "baseline_w": baseline,
                     "energy_gross_j": gross, "energy_net_j": net,
                     "gross_per_inference_j": gross / n, "energy_per_inference_j": net / n,
                     "latency_per_inference_s": (b - a) / n})
    return pd.DataFrame(rows)


def summarize(per_window: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per configuration: mean energy per inference over repeats with a t-interval."""
    from scipy import stats

    ok = per_window[per_window["status"] == "ok"] if len(per_window) else per_window
    rows = []
    for config, g in ok.groupby("config", sort=False):
        e = g["energy_per_inference_j"].to_numpy(float)
        n = len(e)
        sd = float(np.std(e, ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
        rows.append({"config": config, "repeats": n,
                     "energy_per_inference_j": float(e.mean()), "std_j": sd,
                     f"ci{int(confidence * 100)}_half_j": half,
                     "gross_per_inference_j": float(g["gross_per_inference_j"].mean()),
                     "baseline_w": float(g["baseline_w"].mean()),
                     "latency_per_inference_s": float(g["latency_per_inference_s"].mean()),
                     "source": "measured"})
    return pd.DataFrame(rows)


def plot_trace(power: pd.DataFrame, windows: pd.DataFrame, per_window: pd.DataFrame,
               out_png: Path, clock: str = "mono") -> None:
    """Power vs time with run windows shaded and the baseline drawn: a visual sanity check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = sample_times(power, f"host_{clock}_s")
    order = np.argsort(t, kind="stable")
    t0 = float(t[order[0]])
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(t[order] - t0, power["watts"].to_numpy(float)[order], lw=0.6, color="k", label="measured power")
    for _, w in windows.iterrows():
        color = "tab:orange" if w["kind"] == "run" else "tab:blue"
        ax.axvspan(w[f"start_{clock}_s"] - t0, w[f"end_{clock}_s"] - t0, color=color, alpha=0.2)
    for _, w in per_window[per_window["status"] == "ok"].iterrows():
        ax.hlines(w["baseline_w"], w["start_s"] - t0, w["end_s"] - t0, color="tab:red")
    ax.set_xlabel("time since first sample (s)")
    ax.set_ylabel("power (W)")
    ax.set_title("measured power; orange = inference windows, blue = idle, red = baseline")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
