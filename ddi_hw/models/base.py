"""`DynamicNet`: what gated ResNets and DenseNets share -- one forward with two paths, cost
accounting from the cost table, and anytime (budgeted) exits.

Cost accounting. Every forward records per sample and per block j: L_j (1 = block ran; always 1
for blocks that cannot be skipped) and k_j (active channels of the block's gated conv pair; the
full width without a channel gate). The executed cost is then read from the table in one
vectorised pass over an ordered list of *events* (stem, block 0, exit 0, block 1, ..., head):

    block j:  g_j + L_j * (f_j + c_j + V_j(k_j)) + (1 - L_j) * s_j

g_j = layer-gate layers (evaluated whenever the block is reached, including the shared LSTM, once
per call), c_j = channel-gate layers (MGL2S: only evaluated when the block runs) and the pooled sums
its last conv writes for the next block's gates, f_j = layers that run with the block but are not
channel-gated (a projection shortcut, the residual add, the pooled sums written for the head),
V_j(k) = the gated conv pair (first conv on axis "out", second on axis "in") interpolated at k,
s_j = what a skip costs (a DenseNet layer's copy of the previous layer's features into its slot;
0 for a ResNet block, whose output is its input). With straight-through decisions this is
differentiable (the expected cost g + p (f + c + V) + (1 - p) s in the gate's probability p) and
equals the table value for hard decisions.

Budgets (RADI anytime inference). With `budget=B` a sample follows the hard-budget rule of
`ddi_hw.deploy.budget` (the board runner's too, on the same plan numbers): from exit 0 on it goes on
past an exit, and into a block's channel gate and convs, only while what it spent plus that work
plus the cheapest way to its next exit fits in B; otherwise it stops there and answers with the last
exit branch it ran (exit_taken; -1 = it reached the head, i.e. its whole path fit). Its cost is
everything it ran -- every exit branch passed, blocks past its last exit, the gates of the block it
stopped in -- and never exceeds B, except when its own path up to exit 0 already does (before exit
0 there is no fallback: it runs to exit 0 and stops there). The sparse path runs nothing past the
stop; the dense path computes everything and applies the rule to its decisions, so both give the
same exits and costs (`stopped_block`: the block a sample stopped in, -1 = at an exit or the head).
Budgeted costs are not differentiable (inference only). Without a budget, exit branches are not
part of the cost (the sparse path does not run them; the dense path computes them for training
only).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ddi_hw.cost import CostTable, interp, model_specs
from ddi_hw.deploy.budget import GATES_AND_CHANNEL_GATE, GATES_ONLY, BudgetPlan, BudgetWalk, walk
from ddi_hw.errors import UserError
from ddi_hw.models import gates
from ddi_hw.models.gates import GATE_KINDS, LAYER_GATE, hard_decision
from ddi_hw.models.output import DynamicOutput, SigmoidViews
from ddi_hw.models.sparse_ops import FoldCache


def _given(v) -> bool:
    """A gate annotation that is set (the table may hold None, NaN or '' for 'no gate')."""
    return isinstance(v, str) and v not in ("", "nan", "None")


class CostPlan:
    """Cost-table numbers laid out as tensors for the vectorised per-sample cost.

    Rows are assigned to events by their `block` column; inside a block by role and gates:
    backbone rows with an `out_gate` / `in_gate` form V (costed at k on that axis), other backbone
    rows f, gate rows whose `gate_kind` has the role "channel" c (runs only with the block), other
    gate rows g (layer gate: runs whenever the block is reached), rows of kind "copy" s (only when
    the block is skipped: `energy_models.dataflow`, `copy`). The pooled sums a block's conv writes
    only for gates (a `sums` row of role gate) are c: gate work paid only when that conv runs; a
    fixed event's gate rows (the stem's sums for block 0's gates) are the next block's g. cg is c
    without those sums: what a budget that stops the image between channel gate and convs charges.
    """

    def __init__(self, table: CostTable, events: list[tuple[str, str]], skippable: list[bool]):
        self.table, self.events = table, events
        self.metrics = table.metrics
        by_block: dict[str, list[str]] = {}
        for name, row in table.rows.items():
            by_block.setdefault(str(row.get("block", "")), []).append(name)
        self._first_gates: set[str] = set()  # gate work of a fixed event: the next block's layer-gate cost
        for s, (kind, b) in enumerate(events):
            nxt = next((b2 for k2, b2 in events[s + 1:] if k2 == "block"), None)
            if kind == "fixed" and nxt is not None:
                moved = [n for n in by_block.get(b, []) if table.rows[n].get("role") == "gate"]
                by_block[b] = [n for n in by_block[b] if n not in moved]
                by_block.setdefault(nxt, []).extend(moved)
                self._first_gates.update(moved)
        known = {b for _, b in events}
        stray = [n for b, ns in by_block.items() if b not in known for n in ns]
        if stray:
            raise UserError(f"cost table rows {stray[:3]} belong to no block of this model; "
                            "profile this exact model configuration")
        blocks = [b for kind, b in events if kind == "block"]
        self.J, self.S = len(blocks), len(events)
        cols = {"fixed": [], "block": [], "exit": []}
        for s, (kind, _) in enumerate(events):
            cols[kind].append(s)
        self.fixed_cols, self.block_cols, self.exit_cols = (torch.tensor(cols[k], dtype=torch.long)
                                                            for k in ("fixed", "block", "exit"))
        self.skippable = torch.tensor(skippable, dtype=torch.bool)
        self.skip_idx = np.flatnonzero(np.asarray(skippable, dtype=bool))  # == the model's skippable_idx
        parts = [self._split(by_block.get(b, [])) for b in blocks]
        self.K = torch.tensor([p[0] for p in parts], dtype=torch.float64)
        self.K32 = self.K.numpy().astype(np.float32)  # SparseRun's starting active counts
        kmax = int(max([p[0] for p in parts] + [1]))
        total = lambda names, m: sum(table.dense(n, m) for n in names)  # noqa: E731
        self.V, self.g, self.c, self.cg, self.f, self.s, self.fixed, self.exit = {}, {}, {}, {}, {}, {}, {}, {}
        for m in self.metrics:
            V = torch.zeros(self.J, kmax + 1, dtype=torch.float64)
            for j, (K, gated, *_rest) in enumerate(parts):
                if gated:
                    curve = sum(table.curve(n, ax, m) for n, ax in gated)
                    V[j, : K + 1] = curve
                    V[j, K + 1:] = curve[-1]
            self.V[m] = V
            self.f[m], self.g[m], self.c[m], self.s[m], self.cg[m] = (
                torch.tensor([total(p[i], m) for p in parts], dtype=torch.float64) for i in (2, 3, 4, 5, 6))
            self.fixed[m] = torch.tensor([total(by_block.get(b, []), m) for k, b in events if k == "fixed"],
                                         dtype=torch.float64)
            self.exit[m] = torch.tensor([total(by_block.get(b, []), m) for k, b in events if k == "exit"],
                                        dtype=torch.float64)
        # cheapest possible cost of each event: the budget rule's cheapest way on (ddi_hw.deploy.budget)
        self.min_event = {}
        for m in self.metrics:
            ev = torch.zeros(self.S, dtype=torch.float64)
            ev[self.fixed_cols] = self.fixed[m]
            ev[self.exit_cols] = self.exit[m]
            full = self.f[m] + self.c[m] + self.V[m][:, 0]  # run, all channels off
            ev[self.block_cols] = self.g[m] + torch.where(self.skippable, torch.minimum(self.s[m], full), full)
            self.min_event[m] = ev

    def _split(self, names: list[str]):
        gated, fixed, lgate, cgate, skip, widths = [], [], [], [], [], set()
        channel_gate = []  # c without the sums: what a budget that stops the image after the channel gate charges
        for n in names:
            row = self.table.rows[n]
            if row.get("kind") == "copy":  # paid only when the block is skipped
                skip.append(n)
            elif n in self._first_gates:  # e.g. the stem's pooled sums for block 0's gates: paid
                lgate.append(n)  # whenever the block is reached (the stem always ran before it)
            elif row.get("kind") == "sums" and row.get("role") == "gate":  # sums a launch of this block
                cgate.append(n)  # writes for gates: paid only when this block runs
                if self.table.rows.get(str(row.get("fused_into")), {}).get("role") == "gate":
                    channel_gate.append(n)  # written by the channel gate's own conv, for its FC
            elif row.get("role", "backbone") == "gate":  # channel gates run only with their block
                kind = GATE_KINDS.get(str(row.get("gate_kind")))
                if kind is None:
                    raise UserError(f"cost table row {n!r} is a gate of unknown kind {row.get('gate_kind')!r}; "
                                    "profile this model again")
                (cgate if kind.role == "channel" else lgate).append(n)
                if kind.role == "channel":
                    channel_gate.append(n)
            elif _given(row.get("out_gate")):
                gated.append((n, "out"))
                widths.add(len(self.table.curve(n, "out", "flops")) - 1)
            elif _given(row.get("in_gate")):
                gated.append((n, "in"))
                widths.add(len(self.table.curve(n, "in", "flops")) - 1)
            else:
                fixed.append(n)
        if len(widths) > 1:
            raise UserError(f"gated layers {[n for n, _ in gated]} disagree on the channel count {widths}")
        return (widths.pop() if widths else 0), gated, fixed, lgate, cgate, skip, channel_gate

    def check(self, metric: str) -> None:
        if metric not in self.metrics:
            self.table.curve("", "out", metric)  # raises the UserError naming the missing column

    def events_matrix(self, L: torch.Tensor, k: torch.Tensor, metric: str, with_exits: bool) -> torch.Tensor:
        """(N, S) cost of each event per sample; L, k are (N, J)."""
        L64 = L.to(torch.float64)
        blk = self.g[metric] + L64 * (self.f[metric] + self.c[metric] + interp(self.V[metric], k)) \
            + (1 - L64) * self.s[metric]
        n = L.shape[0]
        ev = torch.zeros(n, self.S, dtype=torch.float64)
        ev = ev.index_copy(1, self.block_cols, blk)
        if len(self.fixed_cols):
            ev = ev.index_copy(1, self.fixed_cols, self.fixed[metric].expand(n, -1))
        if with_exits and len(self.exit_cols):
            ev = ev.index_copy(1, self.exit_cols, self.exit[metric].expand(n, -1))
        return ev

    def hard_total(self, L: np.ndarray, k: np.ndarray, metric: str) -> torch.Tensor:
        """(N,) total cost without exits for hard decisions L, k ((N, J) numpy, integer k: the table
        values themselves, which is what `events_matrix` interpolates to). In numpy: the sparse
        path's per-forward bookkeeping at batch 1, where each torch op costs ~5 us of dispatch."""
        if not hasattr(self, "_np"):
            self._jidx = np.arange(self.J)
            self._np = {m: (float(self.fixed[m].sum()), self.g[m].numpy(), (self.f[m] + self.c[m]).numpy(),
                            self.V[m].numpy(), self.s[m].numpy()) for m in self.metrics}
        fixed, g, fc, V, s = self._np[metric]
        v = V[self._jidx, k.astype(np.int64)]  # (N, J)
        L64 = L.astype(np.float64)
        return torch.from_numpy(fixed + (g + L64 * (fc + v) + (1 - L64) * s).sum(1))

    def dense_cost(self, metric: str) -> float:
        """Static backbone: every block runs with every channel, no gates, no exits."""
        self.check(metric)
        blocks = self.f[metric] + self.V[metric].gather(1, self.K.long().unsqueeze(1)).squeeze(1)
        return float(self.fixed[metric].sum() + blocks.sum())

    def export(self, metric: str) -> dict:
        """This plan in one metric as plain numbers (the bundle manifest's `cost_plan`, read by the
        board runner): events in execution order and their cheapest costs."""
        self.check(metric)
        events, fixed_i, block_i, exit_i = [], 0, 0, 0
        for kind, _ in self.events:
            if kind == "fixed":
                events.append({"kind": "fixed", "cost": float(self.fixed[metric][fixed_i])})
                fixed_i += 1
            elif kind == "block":
                K = int(self.K[block_i])
                events.append({"kind": "block", "index": block_i, "g": float(self.g[metric][block_i]),
                               "f": float(self.f[metric][block_i]), "c": float(self.c[metric][block_i]),
                               "s": float(self.s[metric][block_i]),  # paid only when skipped (a DenseNet copy)
                               "cg": float(self.cg[metric][block_i]),  # c's channel gate alone (no sums)
                               "V": [float(v) for v in self.V[metric][block_i, :K + 1]]})
                block_i += 1
            else:
                events.append({"kind": "exit", "index": exit_i, "cost": float(self.exit[metric][exit_i])})
                exit_i += 1
        return {"metric": metric, "events": events, "min_event": [float(v) for v in self.min_event[metric]]}

    def budget_plan(self, metric: str) -> BudgetPlan:
        """The budget rule's view of this plan (`ddi_hw.deploy.budget`, shared with the board runner)."""
        if not hasattr(self, "_budget_plans"):
            self._budget_plans = {}
        if metric not in self._budget_plans:
            self._budget_plans[metric] = BudgetPlan(self.export(metric))
        return self._budget_plans[metric]

    def budget_outcome(self, L: np.ndarray, k: np.ndarray, budget: float, metric: str):
        """The budget rule over decisions known in advance ((N, J) float64 block_run / block_active of
        the dense path, which do not depend on the budget): the walk (where each image stops, the exit
        it answers with) and each metric's charged cost."""
        w = walk(self.budget_plan(metric), budget, L, k)
        return w, {m: self.budget_plan(m).charged(L, k, w.stop_col, w.stage, w.ran) for m in self.metrics}


class DynamicNet(nn.Module):
    """Base class. Subclasses set `events` [("fixed"|"block"|"exit", block name)] in execution
    order, `block_skippable`, `skippable_idx`, `num_skippable`, `gate_widths` {gate: K}, annotate
    modules with `ddi_*` attributes, and implement `_forward_dense(x, force) -> DynamicOutput`
    (with block_run / block_active) and `_forward_sparse(x, force, run: SparseRun)`."""

    input_size: int = 32
    family: str = ""  # "resnet" | "densenet": picks the channel-gate kind (gates.CHANNEL_GATE_OPTIONS)
    skip_forced_gates: bool = True  # False: run gates even when `force` overrides every decision

    def __init__(self):
        super().__init__()
        self._table: CostTable | None = None
        self._plan: CostPlan | None = None
        self._tracing = False

    # ------------------------------------------------------------------ cost table
    def attach_cost_table(self, table: CostTable) -> "DynamicNet":
        """Use a profiled table (flops, energy, latency) for every reported cost."""
        missing = [s.name for s in self.specs() if s.name not in table]
        if missing:
            raise UserError(f"cost table lacks {len(missing)} layers of this model (e.g. {missing[0]!r}); "
                            "profile this exact model configuration")
        self._table, self._plan = table, None
        return self

    def _build_default_table(self) -> None:
        """FLOPs-only table from the traced specs (one source for FLOPs). Built when the model is
        built, so a forward never starts a nested trace (e.g. inside `profile_model`)."""
        self._table, self._plan = CostTable.from_specs(self.specs()), None

    @property
    def cost_table(self) -> CostTable:
        if self._table is None:
            self._build_default_table()
        return self._table

    def specs(self, batch: int = 1):
        """Layer specs of this model (dense path: every gate and exit executed)."""
        self._tracing = True
        try:
            return model_specs(self, (batch, 3, self.input_size, self.input_size))
        finally:
            self._tracing = False

    @property
    def plan(self) -> CostPlan:
        if self._plan is None:
            self._plan = CostPlan(self.cost_table, self.events, self.block_skippable)
        return self._plan

    @property
    def exit_blocks(self) -> list[str]:
        return [b for kind, b in self.events if kind == "exit"]

    def dense_cost(self, metric: str = "flops") -> float:
        """Cost of the static backbone (no gates, no exits) from the cost table."""
        return self.plan.dense_cost(metric)

    def gate_overhead(self, metric: str = "flops"):
        """Per block: backbone cost (dense) and layer/channel gate cost relative to it
        (paper: LSTM gate ~0.04% / <1%, CNN gate ~12.5% of a block, DenseNet light gate ~11%).
        `channel_gate` is the plan's c: it also holds the pooled sums the
        block's last conv writes for the next block's gates (their adds and 2 words per channel)."""
        import pandas as pd

        plan = self.plan
        plan.check(metric)
        names = [b for kind, b in self.events if kind == "block"]
        backbone = plan.f[metric] + plan.V[metric].gather(1, plan.K.long().unsqueeze(1)).squeeze(1)
        return pd.DataFrame({
            "block": names, "backbone": backbone.numpy(), "layer_gate": plan.g[metric].numpy(),
            "channel_gate": plan.c[metric].numpy(),
            "layer_gate_ratio": (plan.g[metric] / backbone).numpy(),
            "channel_gate_ratio": (plan.c[metric] / backbone).numpy()})

    @property
    def block_names(self) -> list[str]:
        """Module names of the blocks in execution order (columns of `block_run`)."""
        return [b for kind, b in self.events if kind == "block"]

    @property
    def skippable_block_names(self) -> list[str]:
        """Names of the layer-gated (skippable) blocks: the columns of `layer_decisions`."""
        names = self.block_names
        return [names[j] for j in self.skippable_idx]

    # ------------------------------------------------------------------ gates (ask the registry)
    def _choose_channel_gate(self, channel_gates: bool, option: str) -> None:
        self.channel_gate = gates.channel_gate_kind(option if channel_gates else None, self.family)

    def _build_shared_gates(self, layer_gates: bool) -> None:
        """The recurrent parts shared by all gates of a kind (built after the blocks)."""
        self.layer_gate = LAYER_GATE.make_shared() if layer_gates else None
        kind = self.channel_gate
        self.channel_rnn = kind.make_shared() if kind is not None and kind.make_shared else None

    def _annotate(self, module: nn.Module, block: str, role: str, out_gate=None, in_gate=None,
                  layer_gate=None, gate_kind=None) -> None:
        module.ddi_block, module.ddi_role, module.ddi_gate_kind = block, role, gate_kind
        module.ddi_out_gate, module.ddi_in_gate, module.ddi_layer_gate = out_gate, in_gate, layer_gate

    def _annotate_gated_block(self, p: str, block: nn.Module) -> None:
        """Annotate block `p` whose gated conv pair is conv1 (out) -> conv2 (in): its layer gate
        runs whenever the block is reached, its channel gate and backbone only with the block."""
        lg = f"{p}.lgate" if block.lgate is not None else None
        cg = f"{p}.cgate" if block.cgate is not None else None
        for name, m in block.named_modules():
            top = name.split(".")[0]
            if top == "lgate":
                self._annotate(m, p, "gate", gate_kind=LAYER_GATE.name)
            elif top == "cgate":
                self._annotate(m, p, "gate", layer_gate=lg, gate_kind=gates.kind_of(block.cgate).name)
            else:
                self._annotate(m, p, "backbone", out_gate=cg if name == "conv1" else None,
                               in_gate=cg if name == "conv2" else None, layer_gate=lg)

    def _annotate_shared_gates_and_exits(self) -> None:
        """The shared LSTMs (block re-set before every call: one spec per call) and exit branches."""
        for shared, kind in ((self.layer_gate, LAYER_GATE), (self.channel_rnn, self.channel_gate)):
            if shared is not None:
                for m in shared.modules():
                    self._annotate(m, "", "gate", gate_kind=kind.name)
        for i, e in enumerate(self.exits):
            for m in e.modules():
                self._annotate(m, f"exits.{i}", "exit")

    def _check_exit_positions(self, pos: list[int], total: int, what: str) -> None:
        if any(not 0 <= p < total for p in pos) or len(set(pos)) != len(pos):
            raise UserError(f"exit_positions must be distinct {what} indices in 0..{total - 1}")

    # ------------------------------------------------------------------ shared forward steps
    def _dense_layer_decision(self, block, p: str, x, lstate, Lf, jb: int, ones):
        """Dense path: block `p`'s layer decision on input x -> (L, prob, new LSTM state, next jb).
        Unskippable blocks return `ones` itself (callers test `L is ones` to skip the blend);
        jb counts the skippable blocks (the columns of force['layer'])."""
        Lj, pj = ones, ones
        if block.skippable:
            if block.lgate is not None:
                self.layer_gate.at_block(p)
                lstate = self.layer_gate.step(block.lgate(x), lstate)
                logit = self.layer_gate.logit(lstate[0])
                pj, Lj = torch.sigmoid(logit), hard_decision(logit)
            if Lf is not None:
                Lj = torch.as_tensor(Lf[:, jb], dtype=x.dtype)
            jb += 1
        return Lj, pj, lstate, jb

    def _dense_channel_gate(self, block, p: str, x, cstate, Lj, chf: dict, channels: dict, cprobs: dict):
        """Dense path: block `p`'s channel gate on input x -> (mask, active count, new RNN state).
        The RNN state advances only where the block runs (Lj); forced masks override the gate."""
        gname = f"{p}.cgate"
        if cstate is not None:
            self.channel_rnn.at_block(p, block.cgate.ddi_layer_gate)
        logit, new = block.cgate(x, self.channel_rnn, cstate)
        if cstate is not None:
            cstate = tuple(torch.lerp(o, a, Lj[:, None]) for a, o in zip(new, cstate))
        mask = hard_decision(logit)
        if gname in chf:
            mask = torch.as_tensor(chf[gname], dtype=x.dtype)
        channels[gname], cprobs[gname] = mask * Lj[:, None], torch.sigmoid(logit)
        return mask, mask.sum(1), cstate

    def _sparse_channel_mask(self, cgate, gname: str, j: int, x, ex, idx, cstate, chf: dict, gates: bool,
                             run: "SparseRun"):
        """Sparse path: the channel mask of block j for the samples it runs (`ex` local, `idx`
        original indices) -> (mask, new RNN state); the gate does not run when fully forced."""
        if not gates:
            mask = chf[gname] if idx is None else chf[gname][idx]
            run.channel(gname, j, idx, mask, None)
            return mask, cstate
        sub = None if cstate is None or ex is None else tuple(s.index_select(0, ex) for s in cstate)
        logit, new, mask = cgate.sparse(x, self.channel_rnn, cstate if ex is None else sub)
        if cstate is not None:
            cstate = new if ex is None else tuple(s.index_copy(0, ex, t) for s, t in zip(cstate, new))
        if gname in chf:
            src = chf[gname]
            mask = src if idx is None else src[idx]
        run.channel(gname, j, idx, mask, logit)
        return mask, cstate

    def _dense_output(self, logits, exit_logits, L_cols, p_cols, k_cols, channels, cprobs) -> DynamicOutput:
        L, P = torch.stack(L_cols, 1), torch.stack(p_cols, 1)
        skip = self.skippable_idx
        return DynamicOutput(logits=logits, exit_logits=exit_logits, layer_decisions=L[:, skip],
                             layer_probs=P[:, skip], channel_decisions=channels, channel_probs=cprobs,
                             block_run=L, block_active=torch.stack(k_cols, 1))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, mode: str = "dense", force: dict | None = None,
                budget: float | None = None, budget_metric: str = "flops") -> DynamicOutput:
        if mode not in ("dense", "sparse"):
            raise UserError(f"mode must be 'dense' or 'sparse', not {mode!r}")
        force = self._check_force(force or {}, x.shape[0])
        if self._tracing:
            return self._forward_dense(x, force)
        plan = self.plan
        plan.check(budget_metric)
        if budget is not None and not self.exit_blocks:
            raise UserError("a budget needs exit branches; build the model with exits=True")
        if mode == "sparse":
            if self.training:
                raise UserError("mode='sparse' is for inference; call model.eval() first")
            with torch.no_grad():
                run = SparseRun(self, x.shape[0], budget, budget_metric)
                self._forward_sparse(x, force, run)
                return run.finish()
        out = self._forward_dense(x, force)
        with torch._C.DisableTorchFunction():  # bookkeeping, not model compute: hidden from tracers
            return self._account(out, budget, budget_metric)

    def fully_forced(self, force: dict) -> bool:
        """True when `force` fixes every layer and channel decision of this model: the sparse path
        then runs no gate at all (nothing would read its output; set `skip_forced_gates = False`
        to time the gates anyway, as benchmarks/skip_speed.py does). Reported costs still count the
        gates (the cost of the gated model's inference, as in the dense path); the probabilities
        of gates that did not run are NaN."""
        has_gates = self.layer_gate is not None or bool(self.gate_widths)
        return self.skip_forced_gates and has_gates and (self.layer_gate is None or "layer" in force) and \
            all(g in force.get("channel", {}) for g in self.gate_widths)

    def _clear_folds(self) -> None:
        """Tensors may have been replaced (load_state_dict, .to()): forget every folded weight.
        (In-place changes are caught by each `FoldCache` when it is used.)"""
        for m in self.modules():
            for c in (getattr(m, "_fold", None), getattr(m, "fused", None)):
                if isinstance(c, FoldCache):
                    c.clear()

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: tensors may be new objects
        out = super()._apply(fn, *args, **kwargs)
        self._clear_folds()
        return out

    def train(self, mode: bool = True):
        """Also forgets folded weights: a training forward updates BN running statistics inside
        the batch-norm kernel without bumping their version counters, so `FoldCache` could not
        see it (and the sparse path needs `eval()`, which lands here)."""
        out = super().train(mode)
        self._clear_folds()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._clear_folds()
        return out

    def _account(self, out: DynamicOutput, budget, metric) -> DynamicOutput:
        plan, L, k = self.plan, out.block_run, out.block_active
        n = L.shape[0]
        if budget is None or not len(plan.exit_cols):
            out.cost = {m: plan.events_matrix(L, k, m, with_exits=False).sum(1) for m in plan.metrics}
            out.exit_taken = torch.full((n,), -1, dtype=torch.long)
            return out
        # the budget rule on the decisions the dense path made (not differentiable: inference only)
        w, cost = plan.budget_outcome(L.detach().double().numpy(), k.detach().double().numpy(), budget, metric)
        out.cost = {m: torch.from_numpy(c) for m, c in cost.items()}
        taken = torch.from_numpy(w.exit_taken()).long()
        out.exit_taken, out.stopped_block = taken, torch.from_numpy(w.stopped_block()).long()
        stacked = torch.stack([out.logits] + out.exit_logits)  # (1+E, N, C)
        out.logits = stacked[taken + 1, torch.arange(n)]
        return out

    def _check_force(self, force: dict, n: int) -> dict:
        bad = set(force) - {"layer", "channel"}
        if bad:
            raise UserError(f"force keys must be 'layer' and/or 'channel', not {sorted(bad)}")
        out = {}
        if "layer" in force:
            L = torch.as_tensor(force["layer"], dtype=torch.float32)
            if L.shape != (n, self.num_skippable):
                raise UserError(f"force['layer'] must have shape ({n}, {self.num_skippable}), got {tuple(L.shape)}")
            out["layer"] = L
        if "channel" in force:
            out["channel"] = {}
        widths = self.gate_widths
        for g, m in force.get("channel", {}).items():
            K = widths.get(g)
            if K is None:
                raise UserError(f"force['channel'] names unknown gate {g!r}; gates: {list(widths)[:3]}...")
            if type(m) is not torch.Tensor or m.dtype != torch.float32:  # (a float32 tensor is used as it is)
                m = torch.as_tensor(m, dtype=torch.float32)
            if m.shape != (n, K):
                raise UserError(f"force['channel'][{g!r}] must have shape ({n}, {self.gate_widths[g]})")
            out["channel"][g] = m
        return out


def keep_rows(keep: torch.Tensor | None, h: torch.Tensor, pooled, lstate, cstate):
    """Sparse path: keep only rows `keep` (None = all) of the running samples' map, pooled vector,
    layer-gate LSTM state (numpy) and channel-gate RNN state."""
    if keep is None or len(keep) == h.shape[0]:
        return h, pooled, lstate, cstate
    return (h[keep], None if pooled is None else pooled[keep], None if lstate is None else lstate[keep.numpy()],
            None if cstate is None else tuple(s[keep] for s in cstate))


class SparseRun:
    """Book-keeping of one sparse forward: which samples still run, their decisions, exits.

    Decisions are recorded as they come (cheap list appends) and written into (N, J) tensors
    only when needed (at an exit under a budget, and at the end), which keeps the per-block
    overhead at batch 1 small. `active` is None while every sample still runs, else the original
    indices of the running samples; `idx` arguments follow the same convention.
    """

    def __init__(self, net: DynamicNet, n: int, budget, metric: str):
        self.net, self.n, self.budget, self.metric = net, n, budget, metric
        plan = net.plan
        # Decisions are written straight into numpy arrays as they come (an element write costs
        # ~0.2 us, a torch indexing op ~5 us: at batch 1 the bookkeeping was ~0.3-0.8 ms per
        # forward); the torch tensors below share their memory.
        self._L = np.ones((n, plan.J), dtype=np.float32)
        self._k = np.repeat(plan.K32[None], n, 0)
        self._gl = np.full((n, plan.J), np.inf, dtype=np.float32)
        self.L, self.k, self.gate_logits = (torch.from_numpy(a) for a in (self._L, self._k, self._gl))
        self._has_layer_gate = net.layer_gate is not None
        self.channels: dict[str, torch.Tensor] = {}  # gates never reached: zeros at the end
        self.channel_logits: dict[str, torch.Tensor] = {}
        self.active: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self._chan = []
        # the budget rule (`ddi_hw.deploy.budget`), on the decision arrays above as they fill
        self.walk = BudgetWalk(plan.budget_plan(metric), budget, self._L, self._k) \
            if budget is not None and len(plan.exit_cols) else None

    # ---------------------------------------------------------------- recording
    def sub(self, local: torch.Tensor | None) -> torch.Tensor | None:
        """Original indices of the running samples selected by local indices `local`."""
        if local is None:
            return self.active
        return local if self.active is None else self.active[local]

    def layer(self, j: int, d: np.ndarray, logit: np.ndarray | None) -> None:
        """Block j's layer decisions `d` (and gate logits; None: forced without running the gate,
        logged as NaN) for the running samples."""
        rows = slice(None) if self.active is None else self.active.numpy()
        self._L[rows, j] = d
        if logit is not None:
            self._gl[rows, j] = logit
        elif self._has_layer_gate:
            self._gl[rows, j] = np.nan

    def forced_layers(self, L: torch.Tensor) -> None:
        """Every layer decision forced and every sample running to the end: record them in one go
        (instead of one `layer` call per block) -- gates did not run, their logits are unknown."""
        skip = self.net.skippable_idx
        self.L[:, skip] = (L > 0.5).to(self.L.dtype)
        if self.net.layer_gate is not None:
            self.gate_logits[:, skip] = float("nan")

    def channel(self, gate: str, j: int, idx, mask: torch.Tensor, logit: torch.Tensor) -> None:
        m = mask.numpy()  # 0/1: the active count is the number of nonzeros (cheaper than a sum)
        self._k[slice(None) if idx is None else idx.numpy(), j] = np.count_nonzero(m) if len(m) == 1 else \
            np.count_nonzero(m, axis=1)
        self._chan.append((gate, idx, mask, logit))

    def flush(self) -> None:
        """Collect the recorded channel masks and logits per gate (layer decisions and active
        counts are already in place)."""
        nan = {}  # logits of gates that did not run (forced decisions): one NaN tensor per width
        for gate, idx, mask, lg in self._chan:
            if lg is None:  # forced without running the gate: unknown
                K = mask.shape[1]
                lg = nan.get(K)
                if lg is None:
                    lg = nan[K] = torch.full((self.n, K), float("nan"))
                if idx is not None:
                    lg = lg[: len(idx)]
            if idx is None:
                self.channels[gate], self.channel_logits[gate] = mask, lg
            else:
                if gate not in self.channels:
                    self.channels[gate] = torch.zeros(self.n, self.net.gate_widths[gate])
                if gate not in self.channel_logits:
                    self.channel_logits[gate] = torch.full((self.n, self.net.gate_widths[gate]), -float("inf"))
                self.channels[gate][idx] = mask
                self.channel_logits[gate][idx] = lg
        self._chan = []

    # ---------------------------------------------------------------- exits
    def _store(self, idx, logits: torch.Tensor) -> None:
        if self.logits is None:
            if idx is None:
                self.logits = logits
                return
            self.logits = logits.new_zeros(self.n, logits.shape[1])
        if idx is None:
            self.logits[:] = logits
        else:
            self.logits[idx] = logits

    def _running(self) -> np.ndarray:
        return np.arange(self.n) if self.active is None else self.active.numpy()

    def at_exit(self, i: int, h: torch.Tensor, branch: nn.Module) -> torch.Tensor | None:
        """Under a budget: the running samples the rule says may need exit i run its branch (their
        fallback from now on; `ddi_hw.deploy.budget`); returns the local indices of those that go on.
        None: no budget, everyone continues and no exit branch runs."""
        if self.walk is None:
            return None
        act = self._running()
        run = np.flatnonzero(self.walk.at_exit(i)[act])
        if len(run) == len(act):
            self._store(self.active, branch(h))
        elif len(run):
            loc = torch.from_numpy(run)
            self._store(torch.from_numpy(act[run]), branch(h[loc]))
        keep = np.flatnonzero(self.walk.alive[act])
        self.active = torch.from_numpy(act[keep])
        return torch.from_numpy(keep)

    def admit(self, j: int, ex: torch.Tensor | None, mask: torch.Tensor | None = None):
        """Under a budget, before block j runs its channel gate (`mask` None) or its convs (`mask`:
        the channel masks chosen, already recorded by `channel`) for the running samples `ex` (local
        indices, None = all): the samples that do not fit stop here, charged the block's gates
        (`ddi_hw.deploy.budget`). Returns (keep, ex, go): the local indices of the running samples
        that stay (None = all: the caller keeps those rows of its state, `keep_rows`), `ex` in that
        new numbering (None = all of them run the block), and the positions in the old `ex` that
        go on (the rows of the masks already chosen)."""
        w = self.walk
        if w is None or not w.armed:
            return None, ex, None
        act = self._running()
        rows = act if ex is None else act[ex.numpy()]
        ok = w.admit(j, rows, GATES_ONLY if mask is None else GATES_AND_CHANNEL_GATE)
        if ok.all():
            return None, ex, None
        keep = np.flatnonzero(w.alive[act])
        self.active = torch.from_numpy(act[keep])
        go = np.flatnonzero(ok)
        if ex is not None:
            ex = np.searchsorted(keep, ex.numpy()[go])  # the stopped samples were all in ex
            ex = None if len(ex) == len(keep) else torch.from_numpy(ex)
        return torch.from_numpy(keep), ex, torch.from_numpy(go)

    def at_end(self, logits: torch.Tensor) -> None:
        """The samples still running reached the head (under a budget: their whole path fit)."""
        self._store(self.active, logits)

    def finish(self) -> DynamicOutput:
        self.flush()
        net, plan, w = self.net, self.net.plan, self.walk
        if w is None:
            cost = {m: plan.hard_total(self._L, self._k, m) for m in plan.metrics}
            taken, stopped = torch.full((self.n,), -1, dtype=torch.long), None
        else:
            cost = {m: torch.from_numpy(plan.budget_plan(m).charged(self._L, self._k, w.stop_col, w.stage, w.ran))
                    for m in plan.metrics}
            taken, stopped = (torch.from_numpy(a).long() for a in (w.exit_taken(), w.stopped_block()))
        skip = plan.skip_idx  # (numpy indexing: a torch op per small tensor costs ~5 us at batch 1)
        for g, K in net.gate_widths.items():  # gates never reached (their blocks skipped for all)
            if g not in self.channels:
                self.channels[g] = torch.zeros(self.n, K)
        return DynamicOutput(
            logits=self.logits, exit_logits=[], layer_decisions=torch.from_numpy(self._L[:, skip]),
            layer_probs=torch.sigmoid(torch.from_numpy(self._gl[:, skip])), channel_decisions=self.channels,
            cost=cost, exit_taken=taken, channel_probs=SigmoidViews(self.channel_logits), block_run=self.L,
            block_active=self.k, stopped_block=stopped)
