"""Budgeted (anytime, RADI) inference: where an image stops under a hard budget and what it is charged.

One rule, run by the model (`ddi_hw.models.base`: dense and sparse paths, batched) and by the board
runner (`ddi_hw.deploy.backends.run_image`, one image), on the same numbers (the cost plan,
`CostPlan.export`, shipped in the bundle manifest as `cost_plan`) with the same float64 operations
in the same order, so both take the same decisions and charge the same cost, bit for bit.

Charged cost = everything the image ran: the fixed layers, each block's layer gate whenever the
block is reached, its channel gate and convs when it runs, the exit branches it ran, and the gates of
the block it stopped in. The budget B is known before the image starts, so an exit branch runs only
when the image may need it:

- at exit i, an image that is sure to reach the next exit's branch (or, after the last exit, the
  head) within B even at the dearest (`worst`: every block run at full width, or skipped where the
  skip costs more) skips exit i's branch and runs on unchecked until that next exit;
- any other image runs exit i's branch (its fallback from now on) and goes on only if spent + the
  cheapest way to the next exit fits in B (`rest`: each skippable block skipped -- or run at zero
  channels if its skip cost `s` is dearer --, the others at zero active channels, that exit's branch
  included; after the last exit: up to and including the head);
- before a block runs (its layer gate said "run"), an image that ran its last exit goes on only if
  spent + this block at zero active channels + `rest` fits (so its channel gate is paid for), and
  again once its channel gate chose k channels, with the block at k;
- otherwise it stops there, runs nothing more, and answers with the last exit branch it ran.

So it never spends more than B (up to float64 rounding), every image that stops has an exit
answer, and it reaches the head exactly when its whole path fits. Running every exit passed (the
anytime rule, for a budget not known in advance) would charge the branches of a path that fits
anyway: on the CPU ResNet-38 DDI that was ~31 of ~114 MFLOPs per image at the full budget. Before
exit 0 there is no answer to fall back on: every image runs its own decisions up to exit 0, and if
that path and exit 0's branch cost more than B it stops at exit 0 charged that cost -- the one case
above B (`ddi-hw eval` gives such a budget no row).
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
        high = []  # dearest cost of each event: a block at full width, or skipped if that costs more
        for col in range(self.S):
            j = self.col_block.get(col)
            high.append(self.cost[col] if j is None else max(
                self.g[j] + self.f[j] + self.c[j] + self.V[j][-1], self.g[j] + self.s[j]))
        self.rest, self.worst = [], []  # after event col, up to and including the next exit (or the end):
        for col in range(self.S):       # the cheapest and the dearest cost
            stop = next((c for c in self.exit_col if c > col), self.S - 1)
            lo = hi = 0.0
            for c in range(col + 1, stop + 1):  # a plain loop: the same sum on every Python version
                lo += low[c]
                hi += high[c]
            self.rest.append(lo)
            self.worst.append(hi)

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
                ran: np.ndarray | None = None) -> np.ndarray:
        """(N,) cost of events before each image's stop_col, exit i's branch only where ran[:, i]
        ((N, exits) bool; None: no branch), plus the gates of the block at stop_col when stage > 0.
        L, k: (N, J)."""
        n = len(stop_col)
        total = np.zeros(n)
        for col in range(self.S):
            j = self.col_block.get(col)
            if self.kind[col] == "exit":
                if ran is None:
                    continue
                ev = np.where(ran[:, self.col_exit[col]], self.cost[col], 0.0)
            else:
                ev = self.event_cost(col, L[:, j], k[:, j]) if j is not None else np.full(n, self.cost[col])
            total = total + np.where(col < stop_col, ev, 0.0)
        for j in range(self.J):
            at = (stop_col == self.block_col[j]) & (stage > 0)
            if at.any():
                total = total + np.where(at, self.gates_cost(j, stage), 0.0)
        return total


class BudgetWalk:
    """The rule applied as a forward goes, for n images (the runner: n = 1). The caller reports each
    exit (`at_exit`: who runs its branch) and each block about to run (`admit`); the walk adds the
    events passed in between from the decisions in L, k ((n, J) arrays the caller fills as gates
    decide), keeps who is still running (`alive`), who is sure to reach the next exit (`sure`), which
    branches ran (`ran`) and where each image stopped (`stop_col`, `stage`, `taken`)."""

    def __init__(self, plan: BudgetPlan, budget: float, L: np.ndarray, k: np.ndarray):
        self.p, self.budget, self.L, self.k = plan, float(budget), L, k
        n = L.shape[0]
        self.spent = np.zeros(n)
        self.alive = np.ones(n, dtype=bool)
        self.sure = np.zeros(n, dtype=bool)  # skipped its last exit: reaches the next one unchecked
        self.ran = np.zeros((n, len(plan.exit_col)), dtype=bool)  # exit branches run
        self.stop_col = np.full(n, plan.S)  # first event not run completely (S: ran to the head)
        self.stage = np.zeros(n, dtype=np.int8)  # > 0: stopped in the block at stop_col after its gates
        self.taken = np.full(n, -1)  # last exit branch run (-1: none yet / the head)
        self.done = 0  # events before this are in `spent` of every alive image (exits: where they ran)
        self.armed = False  # checks start at exit 0 (before it there is no fallback)

    def _reach(self, col: int) -> np.ndarray:
        rows = np.flatnonzero(self.alive)
        for c in range(self.done, col):
            j = self.p.col_block.get(c)
            if j is not None:
                self.spent[rows] += self.p.event_cost(c, self.L[rows, j], self.k[rows, j])
            elif self.p.kind[c] != "exit":  # (a branch is added where it runs, by at_exit)
                self.spent[rows] += self.p.cost[c]
        self.done = col
        return rows

    def at_exit(self, i: int) -> np.ndarray:
        """The alive images reached exit i. Returns the (n,) bool mask of those that run its branch
        now (not sure to reach the next exit's branch, or the head, even at the dearest); the others
        go on sure of it. Afterwards `alive` says who goes on: those sure, and those whose cheapest
        way to the next exit still fits after the branch."""
        col = self.p.exit_col[i]
        rows = self._reach(col + 1)
        sure = self.spent[rows] + self.p.worst[col] <= self.budget
        self.sure[rows] = sure
        run = rows[~sure]
        self.spent[run] += self.p.cost[col]
        self.ran[run, i] = True
        self.taken[run] = i
        self.armed = True
        out = run[~(self.spent[run] + self.p.rest[col] <= self.budget)]
        self.alive[out] = False
        self.stop_col[out] = col + 1
        mask = np.zeros(len(self.alive), dtype=bool)
        mask[run] = True
        return mask

    def admit(self, j: int, rows: np.ndarray, stage: int) -> np.ndarray:
        """Images `rows` (alive, their block j decided to run) about to run block j's channel gate
        (stage GATES_ONLY: checked with the block at zero channels) or its convs at k = self.k[:, j]
        (stage GATES_AND_CHANNEL_GATE). Returns the bool mask over `rows` of those that go on; the
        others stop in block j. Images sure of the next exit are not checked (they fit by the check
        that made them sure)."""
        if not self.armed or not len(rows):
            return np.ones(len(rows), dtype=bool)
        col = self.p.block_col[j]
        self._reach(col)
        width = np.zeros(len(rows), dtype=np.int64) if stage == GATES_ONLY else self.k[rows, j]
        ok = self.sure[rows] | ((self.spent[rows] + self.p.event_cost(col, np.ones(len(rows)), width))
                                + self.p.rest[col] <= self.budget)
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
