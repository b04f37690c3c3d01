"""The budget rule (ddi_hw.deploy.budget) against a plain per-image simulation of it, on random cost
plans, decisions and budgets. Costs are whole numbers (exact in float64), so the rule's decisions and
charged costs must equal the simulation's exactly, ties (spent + cheapest rest == budget) included."""
import numpy as np

from ddi_hw.deploy.budget import BudgetPlan, BudgetWalk, walk


def random_plan(rng):
    """Events: a stem, blocks (some skippable, some with a channel gate of width K), exits between
    blocks (the first after >= 1 block), a transition or two, the head. Returns the plan dict and
    each block's skippable flag."""
    J = int(rng.integers(2, 12))
    n_exits = int(rng.integers(1, min(J, 4) + 1))
    exit_after = sorted(rng.choice(J, n_exits, replace=False))
    transitions = set(rng.choice(J, int(rng.integers(0, 3)), replace=False).tolist())
    events, low, skippable = [], [], []
    num = lambda lo, hi: float(rng.integers(lo, hi))  # noqa: E731

    def fixed():
        events.append({"kind": "fixed", "cost": num(1, 500)})
        low.append(events[-1]["cost"])

    fixed()
    for j in range(J):
        K = int(rng.choice([0, 0, 1, 4, 8]))
        V = np.cumsum(rng.integers(0, 300, K + 1)).astype(float).tolist()
        e = {"kind": "block", "index": j, "g": num(0, 30) if rng.random() < 0.7 else 0.0,
             "f": num(0, 200), "c": num(0, 80) if K else 0.0, "V": V}
        skip = bool(rng.random() < 0.7)
        e["s"] = num(0, 40) if skip and rng.random() < 0.5 else 0.0  # paid only when skipped (a DenseNet copy)
        e["cg"] = e["c"] - (num(0, 10) if e["c"] >= 10 and rng.random() < 0.5 else 0.0)  # c less its sums
        skippable.append(skip)
        events.append(e)
        full = e["f"] + e["c"] + V[0]
        low.append(e["g"] + (min(e["s"], full) if skip else full))
        if j in transitions:
            fixed()
        if j in exit_after:
            events.append({"kind": "exit", "index": sum(x["kind"] == "exit" for x in events), "cost": num(1, 400)})
            low.append(events[-1]["cost"])
    fixed()  # head
    return {"events": events, "min_event": low}, skippable


def simulate(plan, skippable, L, k, budget):
    """One image, event by event: (exit taken, stopped block, channel gate ran there, cost charged,
    exit branches run). Cheapest way on: each skippable block skipped (layer gate + its skip cost s)
    or run at zero channels, whichever costs less; the others at zero channels. Dearest: every block
    at full width, or skipped where s is dearer. At an exit, an image whose dearest way through the
    next exit's branch (or the head) fits skips this branch and is not checked until that exit."""
    ev = plan["events"]

    def cheapest(e):
        if e["kind"] != "block":
            return e["cost"]
        full = e["f"] + e["c"] + e["V"][0]
        return e["g"] + (min(e["s"], full) if skippable[e["index"]] else full)

    def dearest(e):
        return e["g"] + max(e["f"] + e["c"] + e["V"][-1], e["s"]) if e["kind"] == "block" else e["cost"]

    def ahead(col, price):  # after event col, up to and including the next exit (or the end)
        total = 0.0
        for e in ev[col + 1:]:
            total += price(e)
            if e["kind"] == "exit":
                break
        return total

    spent, taken, armed, sure, ran = 0.0, -1, False, False, []
    for col, e in enumerate(ev):
        if e["kind"] == "fixed":
            spent += e["cost"]
        elif e["kind"] == "exit":
            armed = True
            sure = spent + ahead(col, dearest) <= budget
            if sure:
                continue
            spent += e["cost"]
            taken = e["index"]
            ran.append(taken)
            if spent + ahead(col, cheapest) > budget:
                return taken, -1, False, spent, ran
        else:
            j = e["index"]
            spent += e["g"]
            if not L[j]:
                spent += e["s"]
                continue
            check = armed and not sure
            if check and spent + e["c"] + e["f"] + e["V"][0] + ahead(col, cheapest) > budget:
                return taken, j, False, spent, ran
            width = min(k[j], len(e["V"]) - 1)
            if len(e["V"]) > 1 and check and spent + e["c"] + e["f"] + e["V"][width] + ahead(col, cheapest) > budget:
                return taken, j, True, spent + e["cg"], ran  # the channel gate ran, not the convs' sums
            spent += e["c"] + e["f"] + e["V"][width]
    return -1, -1, False, spent, ran


def first_exit_cost(plan, L, k):
    """What an image's own decisions cost up to and including exit 0's branch."""
    total = 0.0
    for e in plan["events"]:
        if e["kind"] == "block":
            j = e["index"]
            total += e["g"] + (e["f"] + e["c"] + e["V"][min(k[j], len(e["V"]) - 1)] if L[j] else e["s"])
        else:
            total += e["cost"]
        if e["kind"] == "exit":
            return total


def test_rule_is_the_per_image_simulation():
    """30 random plans x 24 images x 13 budgets: the batched rule (the model's dense path) and the
    online one driven image by image (the board runner) against the simulation."""
    stopped_inside = 0
    for seed in range(30):
        stopped_inside += _compare(np.random.default_rng(seed))
    assert stopped_inside > 50  # many images stop between exits (the case this rule is about)


def _compare(rng) -> int:
    plan, skippable = random_plan(rng)
    bp = BudgetPlan(plan)
    n = 24
    L = (rng.random((n, bp.J)) < 0.6).astype(float)
    L[:, ~np.array(skippable)] = 1.0  # unskippable blocks always run
    k = np.stack([rng.integers(0, K + 1, n) for K in bp.K], 1).astype(float)
    full = bp.charged(np.ones_like(L), bp.K[None].repeat(n, 0).astype(float), np.full(n, bp.S), np.zeros(n),
                      np.ones((n, len(bp.exit_col)), dtype=bool))
    sims = {}
    budgets = [0.5, float(full.max()) * 2 + 0.5, float("inf")]  # below anything, above everything
    budgets += list(rng.uniform(0, full.max(), 5).round() + 0.5)  # between (no ties)
    budgets += list(rng.uniform(0, full.max(), 5).round())  # whole numbers: ties happen
    stopped_inside = skipped = 0
    for budget in budgets:
        w = walk(bp, budget, L, k)
        cost = bp.charged(L, k, w.stop_col, w.stage, w.ran)
        taken, stopped = w.exit_taken(), w.stopped_block()
        for i in range(n):
            want = simulate(plan, skippable, L[i].astype(int), k[i].astype(int), budget)
            sims[budget, i] = want
            got = (int(taken[i]), int(stopped[i]), bool(w.stage[i] == 2), float(cost[i]),
                   np.flatnonzero(w.ran[i]).tolist())
            assert got == want, (budget, i)
            if want[3] > budget:  # only an image whose own path to exit 0 is over the budget
                assert want[0] == 0 and want[1] == -1 and want[3] == first_exit_cost(plan, L[i], k[i].astype(int))
            if want[0] >= 0:  # an image that stops answers with a branch it ran, the last one
                assert want[4] and want[4][-1] == want[0]
            passed = sum(c < w.stop_col[i] for c in bp.exit_col)
            skipped += passed - len(want[4])
        if budget == float("inf"):  # sure of everything: no branch runs, the path is the plain network's
            assert not w.ran.any() and np.array_equal(cost, bp.charged(L, k, np.full(n, bp.S), np.zeros(n)))
        stopped_inside += int((stopped >= 0).sum())
        # the online form, one image at a time in reverse order, as the board runner drives it
        for i in reversed(range(0, n, 3)):
            Li, ki = np.ones((1, bp.J)), bp.K[None].astype(float).copy()
            one = BudgetWalk(bp, budget, Li, ki)
            for col, kind in enumerate(bp.kind):
                if kind == "exit":
                    one.at_exit(bp.col_exit[col])
                    if not one.alive[0]:
                        break
                if kind == "block":
                    j = bp.col_block[col]
                    Li[0, j] = L[i, j]
                    if not L[i, j]:
                        continue
                    if not one.admit(j, np.array([0]), 1)[0]:
                        break
                    ki[0, j] = k[i, j]
                    if bp.K[j] and not one.admit(j, np.array([0]), 2)[0]:
                        break
            assert (int(one.exit_taken()[0]), int(one.stopped_block()[0])) == sims[budget, i][:2]
            assert float(bp.charged(Li, ki, one.stop_col, one.stage, one.ran)[0]) == sims[budget, i][3]
            assert np.flatnonzero(one.ran[0]).tolist() == sims[budget, i][4]
    assert skipped > 0  # branches an image was sure to pass did not run
    return stopped_inside


def test_stops_where_the_next_block_no_longer_fits():
    """By hand: stem 10, block 0 (unskippable, 100), exit 0 (5), block 1 (skippable, layer gate 1,
    channel gate 4, conv 20 + 10 per channel of 4), exit 1 (5), head 3."""
    plan = {"events": [{"kind": "fixed", "cost": 10.0},
                       {"kind": "block", "index": 0, "g": 0.0, "f": 100.0, "c": 0.0, "s": 0.0, "cg": 0.0, "V": [0.0]},
                       {"kind": "exit", "index": 0, "cost": 5.0},
                       {"kind": "block", "index": 1, "g": 1.0, "f": 20.0, "c": 4.0, "s": 0.0, "cg": 4.0,
                        "V": [0.0, 10.0, 20.0, 30.0, 40.0]},
                       {"kind": "exit", "index": 1, "cost": 5.0},
                       {"kind": "fixed", "cost": 3.0}],
            "min_event": [10.0, 100.0, 5.0, 1.0, 5.0, 3.0]}
    bp = BudgetPlan(plan)
    L, k = np.ones((1, 2)), np.array([[0.0, 3.0]])
    # Dearest after exit 0: block 1 at full width (1 + 4 + 20 + 40) + exit 1 (5) = 70; after exit 1:
    # the head, 3. Cheapest after exit 0: block 1 skipped (1) + exit 1 (5) = 6.
    cases = {  # budget -> (exit taken, stopped block, stage, cost, branches run)
        100.0: (0, -1, 0, 115.0, [0]),   # over at exit 0 already: exit 0, charged its path
        120.0: (0, -1, 0, 115.0, [0]),   # 110 + 70 > 120: runs exit 0; 115 + 6 = 121 > 120: stops there
        125.0: (0, 1, 1, 116.0, [0]),    # 116 + 4 + 20 + 0 + 5 = 145 > 125: the layer gate ran, nothing else
        150.0: (0, 1, 2, 120.0, [0]),    # 116 + (4 + 20 + 0) + 5 = 145 fits; at k = 3: 175 > 150
        174.0: (0, 1, 2, 120.0, [0]),    # at k = 3: 116 + 54 + 5 = 175 > 174 (exit 1's branch is reserved)
        175.0: (-1, -1, 0, 173.0, [0]),  # it fits; at exit 1: 170 + 3 = 173 fits for sure, so exit 1's
        178.0: (-1, -1, 0, 173.0, [0]),  # branch is skipped and the head answers
        180.0: (-1, -1, 0, 168.0, []),   # 110 + 70 = 180 fits: sure of exit 1 already, no branch runs
    }
    for budget, want in cases.items():
        w = walk(bp, budget, L, k)
        got = (int(w.exit_taken()[0]), int(w.stopped_block()[0]), int(w.stage[0]),
               float(bp.charged(L, k, w.stop_col, w.stage, w.ran)[0]), np.flatnonzero(w.ran[0]).tolist())
        assert got == want, budget
