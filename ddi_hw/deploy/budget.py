"""Budgeted (anytime, RADI) inference: where an image stops under a hard budget and what it is charged.

One rule, run by the model (`ddi_hw.models.base`: dense and sparse paths, batched) and by the board
runner (`ddi_hw.deploy.backends.run_image`, one image), on the same numbers (the cost plan,
`CostPlan.export`, shipped in the bundle manifest as `cost_plan`) with the same float64 operations
in the same order, so both take the same decisions and charge the same cost, bit for bit.

Charged cost = everything the image ran: the fixed layers, each block's layer gate whenever the
block is reached, its channel gate and convs when it runs, every exit branch it passed (each is a
fallback), and the gates of the block it stopped in. From exit 0 on, the budget B is hard:

- after exit i's branch, the image goes on only if spent + the cheapest way to the next exit fits
  in B (`rest`: each skippable block skipped -- or run at zero channels if its skip cost `s` is
  dearer --, the others at zero active channels, that exit's branch included; after the last exit:
  up to and including the head);
- before a block runs (its layer gate said "run"), it goes on only if spent + this block at zero
  active channels + `rest` fits (so its channel gate is paid for), and again once its channel gate
  chose k channels, with the block at k;
- otherwise it stops there, runs nothing more, and answers with the last exit branch it ran.

So every exit it reaches fits, it never spends more than B (up to float64 rounding) and it reaches
the head exactly when its whole path fits. Before exit 0 there is no answer to fall back on: every
image runs its own decisions up to exit 0 and that branch, and if that alone costs more than B it
stops at exit 0 charged that cost -- the one case above B (`ddi-hw eval` gives such a budget no row).
"""
from __future__ import annotations

import numpy as np

GATES_ONLY, GATES_AND_CHANNEL_GATE = 1, 2  # how much of the block an image stopped in ran (`stage`)


class BudgetPlan:
    """One metric's cost plan (`{"events": [...], "min_event": [...]}`, see `CostPlan.export`) in the
    form the rule reads. Events: fixed {cost}, block {index, g, f, c, s, cg, V}, exit {index, cost}."""

    def __init__(self, plan: dict):
        ev = plan["events"]
        self.S = len(ev)
        self.kind = [e["kind"] for e in ev]
        self.cost = [float(e.get("cost", 0.0)) for e in ev]
        self.block_col = [c for c, e in enumerate(ev) if e["kind"] == "block"]
        self.exit_col = [c for c, e in enumerate(ev) if e["kind"] == "exit"]
        self.J = len(self.block_col)
        blocks = [ev[c] for c in self.block_col]
        self.g, self.f, self.c, self.s, self.cg = (np.array([float(e[x]) for e in blocks], dtype=np.float64)
                                                   for x in ("g", "f", "c", "s", "cg"))
        # s: paid only when skipped (a DenseNet copy); cg: the channel gate alone (c also holds the
        # pooled sums the block's convs write for the next gates, which a block stopped before its
        # convs never writes)
        self.V = [np.asarray(e["V"], dtype=np.float64) for e in blocks]
        self.K = np.array([len(v) - 1 for v in self.V], dtype=np.int64)  # full width (0: no channel gate)
        self.col_block = {c: j for j, c in enumerate(self.block_col)}
        self.col_exit = {c: i for i, c in enumerate(self.exit_col)}
        low = [float(v) for v in plan["min_event"]]
        self.rest = []  # cheapest cost after event col, up to and including the next exit (or the end)
        for col in range(self.S):
            stop = next((c for c in self.exit_col if c > col), self.S - 1)
            total = 0.0
            for c in range(col + 1, stop + 1):  # a plain loop: the same sum on every Python version
                total += low[c]
            self.rest.append(total)

    def event_cost(self, col: int, L: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Cost of event col for images with decisions L (0/1) and k (active channels) of its block."""
        j = self.col_block.get(col)
        if j is None:
            return np.full(len(L), self.cost[col])
        k = np.clip(k.astype(np.int64), 0, self.K[j])  # (a block without a channel gate: its one width)
        L = L.astype(np.float64)
        return self.g[j] + L * (self.f[j] + self.c[j] + self.V[j][k]) + (1.0 - L) * self.s[j]

    def gates_cost(self, j: int, stage: np.ndarray) -> np.ndarray:
        """What ran of block j in an image that stopped in it: its layer gate, and its channel gate
        at stage GATES_AND_CHANNEL_GATE."""
        return np.where(stage == GATES_AND_CHANNEL_GATE, self.g[j] + self.cg[j], self.g[j])

    def charged(self, L: np.ndarray, k: np.ndarray, stop_col: np.ndarray, stage: np.ndarray,
                exits: bool = True) -> np.ndarray:
        """(N,) cost of events before each image's stop_col (exit branches if `exits`), plus the gates
        of the block at stop_col when stage > 0. L, k: (N, J)."""
        n = len(stop_col)
        total = np.zeros(n)
        for col in range(self.S):
            if self.kind[col] == "exit" and not exits:
                continue
            j = self.col_block.get(col)
            ev = self.event_cost(col, L[:, j], k[:, j]) if j is not None else np.full(n, self.cost[col])
            total = total + np.where(col < stop_col, ev, 0.0)
        for j in range(self.J):
            at = (stop_col == self.block_col[j]) & (stage > 0)
            if at.any():
                total = total + np.where(at, self.gates_cost(j, stage), 0.0)
        return total


class BudgetWalk:
    """The rule applied as a forward goes, for n images (the runner: n = 1). The caller reports each
    exit (`at_exit`) and each block about to run (`admit`); the walk adds the events passed in
    between from the decisions in L, k ((n, J) arrays the caller fills as gates decide), keeps who
    is still running (`alive`) and where each image stopped (`stop_col`, `stage`, `taken`)."""

    def __init__(self, plan: BudgetPlan, budget: float, L: np.ndarray, k: np.ndarray):
        self.p, self.budget, self.L, self.k = plan, float(budget), L, k
        n = L.shape[0]
        self.spent = np.zeros(n)
        self.alive = np.ones(n, dtype=bool)
        self.stop_col = np.full(n, plan.S)  # first event not run completely (S: ran to the head)
        self.stage = np.zeros(n, dtype=np.int8)  # > 0: stopped in the block at stop_col after its gates
        self.taken = np.full(n, -1)  # last exit branch run (-1: none yet / the head)
        self.done = 0  # events before this are in `spent` of every alive image
        self.armed = False  # checks start at exit 0 (before it there is no fallback)

    def _reach(self, col: int) -> np.ndarray:
        rows = np.flatnonzero(self.alive)
        for c in range(self.done, col):
            j = self.p.col_block.get(c)
            self.spent[rows] += self.p.event_cost(c, self.L[rows, j], self.k[rows, j]) if j is not None \
                else self.p.cost[c]
        self.done = col
        return rows

    def at_exit(self, i: int) -> np.ndarray:
        """Every alive image ran exit i's branch (its fallback now). Returns `alive` after the check
        whether the cheapest way to the next exit still fits."""
        col = self.p.exit_col[i]
        rows = self._reach(col + 1)
        self.taken[rows] = i
        self.armed = True
        out = rows[~(self.spent[rows] + self.p.rest[col] <= self.budget)]
        self.alive[out] = False
        self.stop_col[out] = col + 1
        return self.alive

    def admit(self, j: int, rows: np.ndarray, stage: int) -> np.ndarray:
        """Images `rows` (alive, their block j decided to run) about to run block j's channel gate
        (stage GATES_ONLY: checked with the block at zero channels) or its convs at k = self.k[:, j]
        (stage GATES_AND_CHANNEL_GATE). Returns the bool mask over `rows` of those that go on; the
        others stop in block j."""
        if not self.armed or not len(rows):
            return np.ones(len(rows), dtype=bool)
        col = self.p.block_col[j]
        self._reach(col)
        width = np.zeros(len(rows), dtype=np.int64) if stage == GATES_ONLY else self.k[rows, j]
        ok = (self.spent[rows] + self.p.event_cost(col, np.ones(len(rows)), width)) + self.p.rest[col] \
            <= self.budget
        out = rows[~ok]
        self.alive[out] = False
        self.stop_col[out], self.stage[out] = col, stage
        return ok

    def exit_taken(self) -> np.ndarray:
        """(n,) after the forward: the exit each image answers with, -1 for the head."""
        return np.where(self.stop_col == self.p.S, -1, self.taken)

    def stopped_block(self) -> np.ndarray:
        """(n,) the block each image stopped in (-1: it stopped at an exit or reached the head)."""
        blocks = np.array(self.p.block_col + [-1])
        j = np.searchsorted(blocks[:-1], self.stop_col)
        return np.where(self.stage > 0, j, -1)


def walk(plan: BudgetPlan, budget: float, L: np.ndarray, k: np.ndarray) -> BudgetWalk:
    """The rule over decisions known in advance (the model's dense path): the same calls, in the same
    order, as a forward makes them. A block's channel gate runs when its plan has one (K > 0)."""
    w = BudgetWalk(plan, budget, L, k)
    for col, kind in enumerate(plan.kind):
        if kind == "exit":
            w.at_exit(plan.col_exit[col])
        elif kind == "block":
            j = plan.col_block[col]
            rows = np.flatnonzero(w.alive & (L[:, j] > 0.5))
            rows = rows[w.admit(j, rows, GATES_ONLY)]
            if plan.K[j] > 0:
                w.admit(j, rows, GATES_AND_CHANNEL_GATE)
    return w
