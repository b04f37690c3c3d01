"""Resource cost of executed layers, read from one cost table (FLOPs, energy or cycles).

The table is the profiler's DataFrame (`energy_models.profile_model`, one row per
(layer, axis, active)); the model only looks numbers up in it, so training loss, evaluation and
plots all read the same source. Without a hardware table, `CostTable.from_specs` builds the
FLOPs-only table from the traced layer specs (`LayerSpec.macs`), so FLOPs also have one source.

`lookup` interpolates linearly between integer channel counts: exact at integers (what hard
decisions produce) and differentiable in `active` (what straight-through decisions need).
"""
from __future__ import annotations

from typing import Iterable

import torch

from ddi_hw.errors import UserError

# metric name -> how its value is made from a table row
METRICS = ("flops", "energy", "latency")
_METRIC_COLUMN = {"energy": "energy_pj", "latency": "cycles"}


class CostTable:
    """Per-layer cost curves indexed by the number of active channels on one axis."""

    def __init__(self, curves: dict[tuple[str, str, str], torch.Tensor], rows: dict[str, dict]):
        self._curves = curves  # (layer, axis, metric) -> float64 tensor, index = active count
        self.rows = rows  # layer -> spec columns of that layer (kind, role, out_ch, ...)
        self.metrics = tuple(m for m in METRICS if any(k[2] == m for k in curves))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_frame(cls, df) -> "CostTable":
        """Build from the profiler DataFrame (columns as in docs/CONTRACTS.md)."""
        need = {"layer", "axis", "active", "macs"}
        missing = need - set(df.columns)
        if missing:
            raise UserError(f"cost table lacks columns {sorted(missing)}; build it with "
                            "energy_models.profile_model or CostTable.from_specs")
        have = ["flops"] + [m for m, col in _METRIC_COLUMN.items() if col in df.columns]
        spec_cols = [c for c in ("kind", "block", "role", "out_gate", "in_gate", "layer_gate", "gate_kind",
                                 "fused_into", "in_ch", "out_ch") if c in df.columns]
        curves: dict[tuple[str, str, str], torch.Tensor] = {}
        rows: dict[str, dict] = {}
        for (layer, axis), g in df.groupby(["layer", "axis"], sort=False):
            g = g.sort_values("active")
            active = g["active"].to_numpy()
            if active[0] != 0 or (active[1:] - active[:-1] != 1).any():
                raise UserError(f"cost table rows for layer {layer!r} axis {axis!r} must cover "
                                "active = 0..K without gaps; regenerate the table")
            for m in have:
                vals = 2.0 * g["macs"].to_numpy() if m == "flops" else g[_METRIC_COLUMN[m]].to_numpy(copy=True)
                curves[(layer, axis, m)] = torch.as_tensor(vals, dtype=torch.float64)
            if axis == "out":
                rows[layer] = {c: g[c].iloc[-1] for c in spec_cols}
        return cls(curves, rows)

    @classmethod
    def from_specs(cls, specs: Iterable) -> "CostTable":
        """FLOPs-only table from `LayerSpec`s: the same rows the profiler makes (the engine's
        dataflow: `energy_models.dataflow.table_specs`), with the same MACs (`row_macs`)."""
        import pandas as pd

        from energy_models.dataflow import row_macs, table_specs

        records = []
        for s, p in table_specs(list(specs)):
            base = s.as_dict()
            base["layer"] = base.pop("name")
            base["fused_into"] = p.fused_into  # the launch a fused row (add, pooled sums) happens in
            for k in range(s.out_ch + 1):
                records.append({**base, "axis": "out", "active": k, "macs": row_macs(s, p, "out", k)})
            if s.in_gate:
                for c in range(s.in_ch + 1):
                    records.append({**base, "axis": "in", "active": c, "macs": row_macs(s, p, "in", c)})
        return cls.from_frame(pd.DataFrame.from_records(records))

    # ------------------------------------------------------------------ queries
    def __contains__(self, layer: str) -> bool:
        return layer in self.rows

    def curve(self, layer: str, axis: str, metric: str) -> torch.Tensor:
        """Cost for active = 0..K (float64)."""
        key = (layer, axis, metric)
        if key not in self._curves:
            if metric not in METRICS:
                raise UserError(f"unknown cost metric {metric!r}; use one of {', '.join(METRICS)}")
            if metric not in self.metrics:
                raise UserError(f"cost table has no {metric!r} column; attach a profiled table "
                                "(energy_models.profile_model) to use it, or use 'flops'")
            raise UserError(f"layer {layer!r} (axis {axis!r}) is not in the cost table; "
                            "profile this model again")
        return self._curves[key]

    def dense(self, layer: str, metric: str = "flops") -> float:
        """Cost of the layer with every channel active."""
        return float(self.curve(layer, "out", metric)[-1])

    def lookup(self, layer: str, axis: str, active: torch.Tensor, metric: str = "flops") -> torch.Tensor:
        """Piecewise-linear interpolation of the table at `active` (exact at integers)."""
        return interp(self.curve(layer, axis, metric), active)

    def total(self, metric: str = "flops", role: str | None = None) -> float:
        """Sum of dense costs over layers (optionally one role: backbone, gate, exit)."""
        return sum(self.dense(n, metric) for n, r in self.rows.items()
                   if role is None or r.get("role", "backbone") == role)


def resource_loss(cost: torch.Tensor, alpha: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The resource term of the training loss, alpha * E (paper Eq. 5).

    `cost` is the per-sample executed cost divided by the dense backbone's (E, differentiable
    through the straight-through decisions). `alpha` is signed: the training loop's rule
    (`ddi_hw.train.next_alpha`) makes it positive to save more and negative to give cost back
    once the saving passes its goal. `dtype`: the loss's dtype (costs are float64).
    """
    mean = cost.mean() if dtype is None else cost.mean().to(dtype)
    return alpha * mean


def interp(curve: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of `curve` (index = active count) at float `active`, any shape.

    `curve` may be (K+1,) or batched (..., K+1) matching `active`'s leading shape plus one.
    """
    active = active.to(torch.float64) if active.dtype != torch.float64 else active
    kmax = curve.shape[-1] - 1
    if kmax == 0:
        return curve[..., 0].expand_as(active).clone() if curve.dim() > 1 else curve[0].expand_as(active).clone()
    a = active.clamp(0, kmax)
    lo = a.detach().floor().clamp(max=kmax - 1).long()
    frac = a - lo.to(a.dtype)
    if curve.dim() == 1:
        c_lo, c_hi = curve[lo], curve[lo + 1]
    else:
        c = curve.expand(*a.shape, kmax + 1)
        c_lo = c.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
        c_hi = c.gather(-1, (lo + 1).unsqueeze(-1)).squeeze(-1)
    return c_lo + frac * (c_hi - c_lo)


def model_specs(model, input_shape) -> list:
    """Layer specs of `model` from the profiler's tracer (one source for layer shapes)."""
    from energy_models.specs import extract_specs

    return extract_specs(model, input_shape)
