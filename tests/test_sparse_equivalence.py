"""The sparse path (skipped work not executed) must give the dense path's logits, decisions,
exits and costs for the same forced decisions; costs must match a per-sample brute-force sum."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddi_hw.models import create_model


def randomize(model, seed=0):
    """Non-trivial BN statistics so BN folding and slicing are really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.2
            m.running_mean = torch.randn(c, generator=g) * 0.2
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model.eval()


def random_force(model, n, g, p_layer=0.5, p_chan=0.5):
    layer = (torch.rand(n, model.num_skippable, generator=g) > p_layer).float()
    chan = {}
    for name, k in model.gate_widths.items():
        m = (torch.rand(n, k, generator=g) > p_chan).float()
        m[0] = 0  # one sample with every channel off, one with every channel on
        if n > 1:
            m[1] = 1
        chan[name] = m
    return {"layer": layer, "channel": chan}


def given(v):
    return isinstance(v, str) and v not in ("", "nan", "None")


def brute_cost(model, force, metric="flops", upto_exit=None):
    """Per-sample executed cost summed row by row over the cost table (independent of the
    vectorised plan): gates, blocks with their active channels, exits passed."""
    table = model.cost_table
    rows_by_block = {}
    for name, row in table.rows.items():
        rows_by_block.setdefault(row["block"], []).append((name, row))
    skip_col = {j: i for i, j in enumerate(model.skippable_idx)}
    n = force["layer"].shape[0]
    out = []
    for s in range(n):
        total, j, seen_exits = 0.0, 0, 0
        for kind, blk in model.events:
            rows = rows_by_block.get(blk, [])
            if kind == "exit":
                if upto_exit is None:
                    continue
                total += sum(table.dense(r, metric) for r, _ in rows)
                if seen_exits == upto_exit:
                    break
                seen_exits += 1
                continue
            if kind == "fixed":
                total += sum(table.dense(r, metric) for r, _ in rows)
                continue
            run = 1.0 if j not in skip_col else float(force["layer"][s, skip_col[j]])
            gate = f"{blk}.cgate"
            for r, row in rows:
                if row.get("kind") in ("sums", "copy"):  # pooled sums a launch of this block writes: only
                    if run == (row["kind"] == "sums"):  # when it runs; a skipped layer's copy: only when skipped
                        total += table.dense(r, metric)
                elif row["role"] == "gate" and ".cgate." not in r and not r.startswith("channel_rnn"):
                    total += table.dense(r, metric)  # layer gate: evaluated whenever reached
                elif not run:
                    continue
                elif given(row.get("out_gate")):
                    k = int(force["channel"][gate][s].sum())
                    total += float(table.curve(r, "out", metric)[k])
                elif given(row.get("in_gate")):
                    k = int(force["channel"][gate][s].sum())
                    total += float(table.curve(r, "in", metric)[k])
                else:
                    total += table.dense(r, metric)
            j += 1
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def brute_budget(model, force, budget, metric="flops"):
    """Per sample, the budget rule walked over the cost table's rows (independent of the plan and of
    ddi_hw.deploy.budget): at an exit, skip its branch if the dearest way through the next exit's
    branch (or the head) fits, and then check nothing until that exit; otherwise run the branch and
    go on only if spent + the cheapest way to the next exit fits; before a block's channel gate only
    if the block at zero channels fits with that cheapest way on, before its convs only if it fits at
    its k. Returns per sample (exit taken, block stopped in or -1, cost of all it ran)."""
    table = model.cost_table
    rows_by_block = {}
    for name, row in table.rows.items():
        rows_by_block.setdefault(row["block"], []).append((name, row))
    skip_col = {j: i for i, j in enumerate(model.skippable_idx)}

    def parts(blk, k):  # (layer gate, channel gate, backbone at k active channels, a skip's copy)
        lg = cg = bb = sk = 0.0
        for r, row in rows_by_block.get(blk, []):
            if row.get("kind") == "copy":  # paid only when skipped
                sk += table.dense(r, metric)
            elif row.get("kind") == "sums":  # with the launch that writes them (`<conv>.sums`)
                if table.rows[r[: -len(".sums")]]["role"] == "gate":
                    cg += table.dense(r, metric)
                else:
                    bb += table.dense(r, metric)
            elif row["role"] == "gate" and ".cgate." not in r and not r.startswith("channel_rnn"):
                lg += table.dense(r, metric)
            elif row["role"] == "gate":
                cg += table.dense(r, metric)
            elif given(row.get("out_gate")):
                bb += float(table.curve(r, "out", metric)[k])
            elif given(row.get("in_gate")):
                bb += float(table.curve(r, "in", metric)[k])
            else:
                bb += table.dense(r, metric)
        return lg, cg, bb, sk

    events, j = [], 0
    for kind, blk in model.events:  # (kind, block index or None, block name)
        events.append((kind, j if kind == "block" else None, blk))
        j += kind == "block"

    def cheapest(e):
        kind, jj, blk = e
        if kind != "block":
            return sum(table.dense(r, metric) for r, _ in rows_by_block.get(blk, []))
        lg, cg, bb, sk = parts(blk, 0)
        return lg + (min(sk, cg + bb) if jj in skip_col else cg + bb)

    def dearest(e):
        kind, jj, blk = e
        if kind != "block":
            return cheapest(e)
        lg, cg, _, sk = parts(blk, 0)
        return lg + max(cg + parts(blk, model.gate_widths.get(f"{blk}.cgate", 0))[2], sk)

    def ahead(col, price):
        total = 0.0
        for e in events[col + 1:]:
            total += price(e)
            if e[0] == "exit":
                break
        return total

    rest = [ahead(col, cheapest) for col in range(len(events))]
    worst = [ahead(col, dearest) for col in range(len(events))]
    out = []
    for s in range(force["layer"].shape[0]):
        spent, taken, armed, sure, stopped, n_exit = 0.0, -1, False, False, -1, 0
        for col, (kind, jj, blk) in enumerate(events):
            if kind == "fixed":
                spent += cheapest((kind, jj, blk))
            elif kind == "exit":
                armed, sure, n_exit = True, spent + worst[col] <= budget, n_exit + 1
                if not sure:
                    spent += cheapest((kind, jj, blk))
                    taken = n_exit - 1
                    if spent + rest[col] > budget:
                        break
            if kind != "block":
                continue
            gate = f"{blk}.cgate"
            k = int(force["channel"][gate][s].sum()) if gate in force["channel"] else 0
            lg, cg, bb0, sk = parts(blk, 0)
            spent += lg
            if jj in skip_col and not force["layer"][s, skip_col[jj]]:
                spent += sk
                continue
            if armed and not sure and spent + cg + bb0 + rest[col] > budget:
                stopped = jj
                break
            spent += cg
            bb = parts(blk, k)[2]
            if gate in force["channel"] and armed and not sure and spent + bb + rest[col] > budget:
                stopped = jj
                break
            spent += bb
        else:
            taken = -1
        out.append((taken, stopped, spent))
    return out


CASES = [
    ("resnet20", dict(layer_gates=True, channel_gates=True), 32),
    ("resnet20", dict(layer_gates=True, channel_gates=True, channel_gate_kind="rnn"), 32),
    ("resnet14", dict(layer_gates=True), 32),
    ("resnet14", dict(channel_gates=True), 32),
    ("densenet_tiny", dict(layer_gates=True, channel_gates=True), 16),
    ("densenet_tiny", dict(layer_gates=True, channel_gates=True, channel_gate_kind="rnn"), 16),
]


@pytest.mark.parametrize("name,kw,size", CASES)
def test_sparse_matches_dense_forced(name, kw, size):
    model = randomize(create_model(name, exits=True, **kw))
    g = torch.Generator().manual_seed(1)
    for trial in range(3):
        n = 5
        x = torch.randn(n, 3, size, size, generator=g)
        force = random_force(model, n, g, p_layer=[0.0, 0.5, 0.9][trial], p_chan=[0.3, 0.5, 0.8][trial])
        with torch.no_grad():
            d = model(x, mode="dense", force=force)
        s = model(x, mode="sparse", force=force)
        assert torch.allclose(d.logits, s.logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(d.layer_decisions, s.layer_decisions)
        for gname in model.gate_widths:
            assert torch.equal(d.channel_decisions[gname], s.channel_decisions[gname])
        assert torch.equal(d.cost["flops"], s.cost["flops"])
        assert torch.allclose(d.cost["flops"], brute_cost(model, force), rtol=1e-12)


@pytest.mark.parametrize("max_groups", [1, 64])
def test_channel_grouping_modes_agree(max_groups):
    """Both batched strategies (group identical masks / union of channels) are exact."""
    model = randomize(create_model("resnet20", channel_gates=True))
    model.max_channel_groups = max_groups
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 32, 32, generator=g)
    force = random_force(model, 6, g)
    force["channel"] = {k: torch.cat([v[:3], v[:3]]) for k, v in force["channel"].items()}  # shared masks
    with torch.no_grad():
        d = model(x, force=force)
    s = model(x, mode="sparse", force=force)
    assert torch.allclose(d.logits, s.logits, atol=1e-4, rtol=1e-4)


def test_unforced_gates_agree():
    """Gate decisions computed by each path (fused LSTM step in sparse) agree."""
    model = randomize(create_model("resnet20", layer_gates=True, channel_gates=True))
    model.layer_gate.proj.bias.data.zero_()  # gates that really decide both ways
    model.layer_gate.proj.weight.data.mul_(20)
    for gname in model.gate_widths:
        model.get_submodule(gname).fc.bias.data.zero_()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # threshold between samples: half of them skip the first block
        first = torch.logit(model(x).layer_probs[:, 0].double()).sort().values
        model.layer_gate.proj.bias.data.fill_(-float(first[3] + first[4]) / 2)
        d = model(x)
    s = model(x, mode="sparse")
    assert torch.equal(d.layer_decisions, s.layer_decisions)
    assert 0 < d.layer_decisions.mean() < 1
    some = next(iter(model.gate_widths))
    assert 0 < d.channel_decisions[some].mean() < 1
    for gname in model.gate_widths:
        assert torch.equal(d.channel_decisions[gname], s.channel_decisions[gname])
    assert torch.allclose(d.logits, s.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("densenet_tiny", 16)])
def test_budget_exits_match(name, size):
    model = randomize(create_model(name, layer_gates=True, channel_gates=True, exits=True))
    g = torch.Generator().manual_seed(4)
    n = 8
    x = torch.randn(n, 3, size, size, generator=g)
    force = random_force(model, n, g)
    n_exits = len(model.exits)
    exit_costs = torch.stack([brute_cost(model, force, upto_exit=i) for i in range(n_exits)], 1)
    final = brute_cost(model, force, upto_exit=n_exits)  # every branch passed, then the head
    budgets = [float(exit_costs.min()) * 0.5, float(exit_costs[:, 2].median()),
               float(exit_costs[:, -1].max()), math.inf]
    for budget in budgets:
        with torch.no_grad():
            d = model(x, force=force, budget=budget)
            s = model(x, mode="sparse", force=force, budget=budget)
        assert torch.equal(d.exit_taken, s.exit_taken)
        assert torch.allclose(d.logits, s.logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(d.cost["flops"], s.cost["flops"])
        # brute force: the exit it answers with and everything it ran, also past that exit up to
        # where it stopped (the budget rule); the head whenever its path with every branch fits
        brute = brute_budget(model, force, budget)
        for i in range(n):
            want = brute[i][0]
            assert int(d.exit_taken[i]) == want
            if final[i] <= budget:
                assert want == -1
            want_cost = brute[i][2]
            assert abs(float(d.cost["flops"][i]) - float(want_cost)) <= 1e-6 * float(want_cost)
            if want >= 0:
                assert torch.allclose(d.logits[i], d.exit_logits[want][i])
    assert (d.exit_taken == -1).all()  # infinite budget: everyone reaches the head


@pytest.mark.parametrize("name,kw,size", [("resnet20", {}, 32), ("resnet20", dict(channel_gate_kind="rnn"), 32),
                                           ("densenet_tiny", {}, 16)])
def test_budget_stops_and_charges_like_brute_force(name, kw, size):
    """Random decisions and budgets (below exit 0's cost, between, above the whole network): the dense
    and the sparse path stop every sample where the per-sample brute force does, charge it the same
    cost (all it ran), never above the budget unless its own path to exit 0 already is, and answer
    with the last exit branch it ran."""
    model = randomize(create_model(name, layer_gates=True, channel_gates=True, exits=True, **kw))
    g = torch.Generator().manual_seed(11)
    n = 12
    x = torch.randn(n, 3, size, size, generator=g)
    first_exit = None
    inside = at_exit = 0
    for trial in range(3):
        force = random_force(model, n, g, p_layer=0.3 + 0.2 * trial)
        full = brute_cost(model, force, upto_exit=len(model.exits))  # every branch, then the head
        first_exit = brute_cost(model, force, upto_exit=0)
        plain = brute_cost(model, force)  # no branch: a path sure of the head runs none
        budgets = [float(first_exit.min()) * 0.5, float(full.max()) * 3, math.inf]
        budgets += (torch.rand(8, generator=g, dtype=torch.float64) * (plain.max() - first_exit.min())
                    + first_exit.min()).tolist()
        for budget in budgets:
            with torch.no_grad():
                d = model(x, force=force, budget=budget)
                s = model(x, mode="sparse", force=force, budget=budget)
            want = brute_budget(model, force, budget)
            for out in (d, s):
                assert [int(t) for t in out.exit_taken] == [w[0] for w in want], budget
                assert [int(b) for b in out.stopped_block] == [w[1] for w in want], budget
                assert torch.allclose(out.cost["flops"], torch.tensor([w[2] for w in want], dtype=torch.float64),
                                      rtol=1e-9)
            for m in d.cost:
                assert torch.equal(d.cost[m], s.cost[m]), m
            over = d.cost["flops"] > budget * (1 + 1e-12)
            assert (d.exit_taken[over] == 0).all() and torch.equal(d.cost["flops"][over], first_exit[over])
            for i in range(n):
                e = int(d.exit_taken[i])
                assert torch.allclose(s.logits[i], d.exit_logits[e][i] if e >= 0 else d.logits[i], atol=1e-4)
            inside += int((d.stopped_block >= 0).sum())
            at_exit += int(((d.exit_taken >= 0) & (d.stopped_block < 0)).sum())
    assert at_exit  # samples stopped at an exit
    # ... and between exits, where the blocks up to the next exit can cost more at their dearest than
    # at their cheapest by more than an exit branch (the ResNets). In densenet_tiny every branch costs
    # more than that spread: an image not sure of the next exit cannot pay its branch and the way on,
    # so it stops at the exit (or, sure, skips the branch); never inside a block.
    bp = model.plan.budget_plan("flops")
    spread = max(bp.worst[c] - bp.rest[c] - bp.cost[c] for c in bp.exit_col)
    assert (inside > 0) == (spread > 0), (inside, spread)


def test_sparse_path_does_not_run_what_it_abandons():
    """Under a budget the sparse path runs a block's channel gate and convs only for the samples the
    rule lets run them (stopped samples run nothing more): rows through each gate and block counted."""
    model = randomize(create_model("resnet20", layer_gates=True, channel_gates=True, exits=True))
    g = torch.Generator().manual_seed(5)
    n = 16
    x = torch.randn(n, 3, 32, 32, generator=g)
    force = random_force(model, n, g, p_layer=0.3)
    model.skip_forced_gates = False  # run the gates, to count them
    seen = {}
    for j, b in enumerate(model.blocks):
        for part, mod in (("block", b), ("cgate", b.cgate)):
            orig = mod.sparse

            def counted(x, *a, _orig=orig, _key=(part, j), **kw):
                seen[_key] = seen.get(_key, 0) + x.shape[0]
                return _orig(x, *a, **kw)
            mod.sparse = counted
    full = brute_cost(model, force, upto_exit=len(model.exits))
    budget = float(full.median())
    with torch.no_grad():
        s = model(x, mode="sparse", force=force, budget=budget)
    plan = model.plan
    col = plan.block_cols.numpy()
    w = plan.budget_plan("flops")
    from ddi_hw.deploy.budget import walk
    ref = walk(w, budget, s.block_run.double().numpy(), s.block_active.double().numpy())
    L = s.block_run.numpy() > 0.5
    for j in range(plan.J):
        passed = ref.stop_col > col[j]  # went past block j
        at = ref.stop_col == col[j]
        assert seen.get(("block", j), 0) == int((passed & L[:, j]).sum()), j
        assert seen.get(("cgate", j), 0) == int(((passed | (at & (ref.stage == 2))) & L[:, j]).sum()), j
    assert (ref.stage > 0).any()  # some samples stopped inside a block


def test_folded_weights_follow_weight_changes():
    """The sparse path's cached BN-folded weights are refreshed after the weights change."""
    model = randomize(create_model("resnet14", layer_gates=True))
    x = torch.randn(2, 3, 32, 32)
    model(x, mode="sparse")
    with torch.no_grad():
        model.blocks[3].bn1.running_var.mul_(4.0)
        model.blocks[0].conv1.weight.add_(0.1)
        d = model(x)
    assert torch.allclose(d.logits, model(x, mode="sparse").logits, atol=1e-4, rtol=1e-4)
    model.load_state_dict(randomize(create_model("resnet14", layer_gates=True), seed=5).state_dict())
    with torch.no_grad():
        d = model(x)
    assert torch.allclose(d.logits, model(x, mode="sparse").logits, atol=1e-4, rtol=1e-4)


GATE_CASES = [
    ("resnet20", dict(layer_gates=True, channel_gates=True), 32),
    ("resnet20", dict(layer_gates=True, channel_gates=True, channel_gate_kind="rnn"), 32),
    ("densenet_tiny", dict(layer_gates=True, channel_gates=True), 16),
]


def count_gate_calls(model):
    """Wrap every gate entry point of the sparse path (layer LSTM step, channel gates) with a counter."""
    calls = []

    def wrap(obj, attr):
        fn = getattr(obj, attr)

        def counted(*a, **k):
            calls.append(attr)
            return fn(*a, **k)
        setattr(obj, attr, counted)
    if model.layer_gate is not None:
        wrap(model.layer_gate, "fused_step")
    for gname in model.gate_widths:
        wrap(model.get_submodule(gname), "sparse")
    return calls


@pytest.mark.parametrize("name,kw,size", GATE_CASES)
def test_fully_forced_sparse_runs_no_gate(name, kw, size):
    """Every decision forced: the sparse path runs no gate, and logits, decisions and costs are
    those of the run that does compute (and override) the gates, and of the dense path."""
    model = randomize(create_model(name, **kw))
    calls = count_gate_calls(model)
    g = torch.Generator().manual_seed(7)
    n = 4
    x = torch.randn(n, 3, size, size, generator=g)
    force = random_force(model, n, g)
    model.skip_forced_gates = False
    ran = model(x, mode="sparse", force=force)
    assert len(calls) > 0  # positive control: the counters see gate calls
    calls.clear()
    model.skip_forced_gates = True
    skipped = model(x, mode="sparse", force=force)
    assert calls == []
    with torch.no_grad():
        dense = model(x, force=force)
    for other in (ran, dense):
        assert torch.allclose(skipped.logits, other.logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(skipped.layer_decisions, other.layer_decisions)
        for gname in model.gate_widths:
            assert torch.equal(skipped.channel_decisions[gname], other.channel_decisions[gname])
        assert torch.equal(skipped.cost["flops"], other.cost["flops"])
    assert torch.isnan(skipped.layer_probs).all()  # gates that did not run have no probability
    # a partly forced model (channel decisions left to the gates) still runs its gates
    model(x, mode="sparse", force={"layer": force["layer"]})
    assert len(calls) > 0


def test_batch1_slice_cache_matches_dense():
    """Batch 1 (one block kernel call, active weights gathered per call): repeated and alternating
    masks stay exact, including after the weights change (folded weights follow)."""
    model = randomize(create_model("resnet14", channel_gates=True))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 3, 32, 32, generator=g)
    forces = [{"channel": {k: (torch.rand(1, w, generator=g) > 0.5).float() for k, w in model.gate_widths.items()}}
              for _ in range(3)]
    for f in forces + forces[::-1]:
        with torch.no_grad():
            d = model(x, force=f)
        assert torch.allclose(d.logits, model(x, mode="sparse", force=f).logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        model.blocks[1].conv1.weight.mul_(1.5)
        d = model(x, force=forces[0])
    assert torch.allclose(d.logits, model(x, mode="sparse", force=forces[0]).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- fused C gate kernels vs modules
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice", "pooled"])
def test_fused_lstm_gate_matches_modules(layout):
    """`SharedLSTMGate.fused_step` (one C call on folded weights) gives the module path's logits
    and LSTM state (embed -> LSTMCell -> linear) over several steps, for every input layout."""
    from ddi_hw.models.gates import LayerGateEmbed, SharedLSTMGate
    torch.manual_seed(0)
    gate, embed = SharedLSTMGate(), LayerGateEmbed(24)
    torch.nn.init.normal_(gate.proj.weight)
    n = 3
    state, fused_state = None, None
    for step in range(4):
        x = torch.randn(n, 24 + 8, 6, 5)[:, :24] if layout == "channel_slice" else torch.randn(n, 24, 6, 5)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            state = gate.step(embed(x), state)
            want = gate.logit(state[0])
            got, fused_state = gate.fused_step(x.mean((2, 3)) if layout == "pooled" else x, embed, fused_state)
        assert torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
        assert torch.allclose(torch.from_numpy(fused_state[:, :10]), state[0], atol=1e-5)
        assert torch.allclose(torch.from_numpy(fused_state[:, 10:]), state[1], atol=1e-5)


@pytest.mark.parametrize("channels_last,n,c,size", [
    (False, 4, 16, 9), (True, 4, 16, 9), (False, 1, 16, 9), (True, 1, 16, 9),
    # >= 32-pixel rows, <= 16 channels: the even/odd-column row kernel on AVX-512 CPUs
    (True, 1, 16, 32), (True, 1, 16, 33), (False, 1, 12, 40), (True, 1, 8, 64)])
def test_fused_cnn_gate_matches_module(channels_last, n, c, size):
    """`ChannelGateCNN.sparse` (batch > 1: channels-last conv + C ReLU/pool/FC head; batch 1: one
    `gate_conv` call) gives the module's logits, and its mask is exactly logit > 0."""
    from ddi_hw.models.gates import ChannelGateCNN
    torch.manual_seed(1)
    gate = ChannelGateCNN(c, 12)
    torch.nn.init.zeros_(gate.fc.bias)
    x = torch.randn(n, c, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, _ = gate(x)
        got, _, mask = gate.sparse(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, (got > 0).float())
    assert 0 < mask.mean() < 1  # both decisions occur


@pytest.mark.parametrize("c_in,c_out,size,stride", [(16, 16, 32, 1), (16, 5, 32, 1), (5, 16, 32, 1), (3, 16, 32, 1),
                                                    (64, 64, 8, 1), (32, 32, 16, 2), (13, 11, 7, 2), (24, 1, 9, 1),
                                                    (16, 12, 33, 1), (7, 9, 70, 1)])
def test_direct_conv3x3_matches_conv2d(c_in, c_out, size, stride):
    """The batch-1 C convolution (packed weights, channel counts not multiples of 8, odd sizes,
    both strides, fused residual and ReLU) against F.conv2d."""
    from ddi_hw.models.sparse_ops import conv3x3, pack3x3
    g = torch.Generator().manual_seed(c_in * 100 + c_out)
    x = torch.randn(1, c_in, size, size, generator=g)
    w, b = torch.randn(c_out, c_in, 3, 3, generator=g), torch.randn(c_out, generator=g)
    want = F.conv2d(x, w, b, stride, 1)
    res = torch.randn(want.shape, generator=g)
    wp, bp = pack3x3(w, b)
    assert torch.allclose(conv3x3(x, wp, bp, c_out, stride), F.relu(want), atol=1e-4, rtol=1e-4)
    assert torch.allclose(conv3x3(x, wp, bp, c_out, stride, residual=res, relu=False), want + res, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("c_in,width,stride,active,size", [
    (16, 16, 1, 8, 16), (16, 16, 1, 16, 16), (16, 16, 1, 0, 16), (16, 32, 2, 5, 16), (64, 64, 1, 63, 16),
    (32, 32, 1, 1, 16),
    # rows of >= 32 pixels, <= 16 channels: the row kernel chain on AVX-512 CPUs (conv1 -> padded planes -> conv2)
    (16, 16, 1, 8, 32), (16, 16, 1, 16, 32), (16, 16, 1, 3, 32), (16, 16, 1, 0, 32), (16, 16, 1, 11, 40)])
def test_block_kernel_matches_masked_dense_block(c_in, width, stride, active, size):
    """`_gatekernels.block` (batch 1, active weights gathered in the call) against the training
    path's masked block, for a few active counts including none and all."""
    from ddi_hw.models.resnet import BasicBlock
    torch.manual_seed(c_in + width + active)
    blk = BasicBlock(c_in, width, stride, layer_gate=False, channel_gate=None)
    for bn in (blk.bn1, blk.bn2, getattr(blk, "sc_bn", None)):
        if bn is not None:
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.uniform_(0.5, 1.5)
    blk.eval()
    x = torch.randn(1, c_in, size, size)
    mask = torch.zeros(1, width)
    mask[0, torch.randperm(width)[:active]] = 1.0
    with torch.no_grad():
        want = blk(x, mask)
        assert torch.allclose(blk.sparse(x, mask), want, atol=1e-4, rtol=1e-4)
        assert torch.allclose(blk.sparse(x, None), blk(x), atol=1e-4, rtol=1e-4)


def test_batch1_unforced_gates_agree():
    """Batch 1 (the fused gate and block kernels) with every gate deciding."""
    torch.manual_seed(0)  # the weights: not whatever state earlier tests left the global RNG in
    model = randomize(create_model("resnet20", layer_gates=True, channel_gates=True))
    model.layer_gate.proj.weight.data.mul_(20)
    for gname in model.gate_widths:
        model.get_submodule(gname).fc.bias.data.zero_()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # layer-gate bias at the median logit of the first block: both decisions occur
        first = torch.logit(model(torch.randn(16, 3, 32, 32, generator=g)).layer_probs[:, 0].double())
        model.layer_gate.proj.bias.data.fill_(-float(first.median()))
    seen_skip = seen_partial = False
    for _ in range(6):
        x = torch.randn(1, 3, 32, 32, generator=g)
        with torch.no_grad():
            d = model(x)
        s = model(x, mode="sparse")
        assert torch.equal(d.layer_decisions, s.layer_decisions)
        for gname in model.gate_widths:
            assert torch.equal(d.channel_decisions[gname], s.channel_decisions[gname])
        assert torch.allclose(d.logits, s.logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(d.cost["flops"], s.cost["flops"])
        seen_skip |= bool((d.layer_decisions == 0).any())
        seen_partial |= any(0 < float(d.channel_decisions[k].mean()) < 1 for k in model.gate_widths)
    assert seen_skip and seen_partial


@pytest.mark.parametrize("kw", [dict(layer_gates=True, channel_gates=True), dict(channel_gates=True),
                                dict(layer_gates=True)])
def test_batch1_c_runner_matches_python_loop(kw, monkeypatch):
    """The batch-1 C runner (`CifarResNet._forward_one`: the whole forward in one call) gives the
    Python block loop's decisions, gate logits, active counts, costs and logits: gates deciding,
    gates run but overridden, and fully forced (no gate runs)."""
    from ddi_hw.models.resnet import CifarResNet
    model = randomize(create_model("resnet20", **kw))
    if model.layer_gate is not None:
        model.layer_gate.proj.bias.data.zero_()
        model.layer_gate.proj.weight.data.mul_(20)
    for gname in model.gate_widths:
        model.get_submodule(gname).fc.bias.data.zero_()
    g = torch.Generator().manual_seed(11)
    calls = []
    real = CifarResNet._forward_one
    monkeypatch.setattr(CifarResNet, "_forward_one", lambda *a: calls.append(1) or real(*a))
    for trial in range(4):
        x = torch.randn(1, 3, 32, 32, generator=g)
        force = {}
        if trial >= 2:  # trial 2: gates run, output overridden (every channel off); 3: fully forced, no gate runs
            force = random_force(model, 1, g)
            if trial == 3:
                force["channel"] = {k: (torch.rand(1, w, generator=g) > 0.5).float()
                                    for k, w in model.gate_widths.items()}
            model.skip_forced_gates = trial == 3
        c = model(x, mode="sparse", force=force)
        with monkeypatch.context() as m:
            m.setattr(CifarResNet, "_forward_one", lambda *a: False)
            p = model(x, mode="sparse", force=force)
        model.skip_forced_gates = True
        assert torch.equal(c.block_run, p.block_run) and torch.equal(c.block_active, p.block_active)
        assert torch.equal(c.layer_probs.isnan(), p.layer_probs.isnan())
        assert torch.allclose(c.layer_probs.nan_to_num(), p.layer_probs.nan_to_num(), atol=1e-5)
        assert c.channel_decisions.keys() == p.channel_decisions.keys()
        for k in p.channel_decisions:
            assert torch.equal(c.channel_decisions[k], p.channel_decisions[k])
        assert set(c.channel_probs) == set(p.channel_probs)
        for k in p.channel_probs:
            assert torch.allclose(c.channel_probs[k].nan_to_num(), p.channel_probs[k].nan_to_num(), atol=1e-5)
        assert torch.equal(c.cost["flops"], p.cost["flops"])
        assert torch.allclose(c.logits, p.logits, atol=1e-4, rtol=1e-4)
    assert len(calls) == 4
    with torch.no_grad():  # another input size than the model's: the Python loop, not the C program's sizes
        small = torch.randn(1, 3, 16, 16, generator=g)
        assert torch.allclose(model(small, mode="sparse").logits, model(small).logits, atol=1e-4, rtol=1e-4)


def test_fused_gate_caches_follow_training():
    """Folded gate weights (LSTM embedding folded into the input projection, CNN gate FC) are
    recomputed after an optimizer step: the sparse path's decisions and logits follow the trained
    weights, and differ from what the stale cache would give."""
    model = randomize(create_model("resnet14", layer_gates=True, channel_gates=True))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10))
    before = model(x, mode="sparse")  # fills every fold cache
    model.train()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "gate" in n], lr=0.5)
    for _ in range(2):
        out = model(x)
        loss = out.logits.sum() + sum(p.sum() for p in out.channel_probs.values()) - out.layer_probs.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        d = model(x)
    s = model(x, mode="sparse")
    assert not torch.allclose(d.layer_probs, before.layer_probs, atol=1e-3)  # a stale cache would fail below
    assert torch.allclose(s.layer_probs, d.layer_probs, atol=1e-5)
    for gname in model.gate_widths:
        assert torch.allclose(s.channel_probs[gname], d.channel_probs[gname], atol=1e-5)
        assert torch.equal(s.channel_decisions[gname], d.channel_decisions[gname])
    assert torch.equal(s.layer_decisions, d.layer_decisions)
    assert torch.allclose(d.logits, s.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("rows", [None, [0, 2, 5], [4], [1, 0, 3, 2, 5, 4]])
def test_add_relu_into_map_rows(fmt, rows):
    """`add_relu_` (batch > 1, one C pass) equals ReLU(out + res) computed by torch, written into the
    map's rows when given; rows not listed stay untouched; layouts the kernel does not take (mixed
    formats) go through the torch fallback with the same result."""
    from ddi_hw.models.sparse_ops import add_relu_
    g = torch.Generator().manual_seed(3)
    m = torch.randn(6, 16, 5, 7, generator=g).contiguous(memory_format=fmt)
    idx = torch.arange(6) if rows is None else torch.tensor(rows)
    out = torch.randn(len(idx), 16, 5, 7, generator=g).contiguous(memory_format=fmt)
    want_rows = F.relu(out + m[idx])
    if rows is None:
        res = m[idx].contiguous(memory_format=fmt)
        got = add_relu_(out.clone(), res)
        assert torch.allclose(got, want_rows, atol=0, rtol=0)
        pool = torch.empty(6, 16)
        add_relu_(out.clone(), res, None, pool)
        assert torch.allclose(pool, want_rows.mean((2, 3)), atol=1e-6, rtol=1e-5)
        mixed = out.clone().contiguous(memory_format=torch.channels_last if fmt == torch.contiguous_format
                                       else torch.contiguous_format)
        assert torch.equal(add_relu_(mixed, res), want_rows)
        return
    want = m.clone()
    want[idx] = want_rows
    got = add_relu_(out.clone(), m[idx], (m.clone(), idx))
    assert torch.equal(got, want)
    pool = torch.full((6, 16), 7.0)  # the written rows' spatial means; the other rows untouched
    add_relu_(out.clone(), m[idx], (m.clone(), idx), pool)
    want_pool = torch.full((6, 16), 7.0)
    want_pool[idx] = want_rows.mean((2, 3))
    assert torch.allclose(pool, want_pool, atol=1e-6, rtol=1e-5)
    other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
    fb = add_relu_(out.clone().contiguous(memory_format=other), m[idx], (m.clone(), idx))
    assert torch.equal(fb, want)


@pytest.mark.parametrize("n_run", [1, 3])
def test_block_writes_running_rows_into_the_map(n_run):
    """A skippable block run by some samples of a batch (the layer-skipping path) writes exactly its
    dense result into those rows of the stage map, in place, and leaves the others as they were."""
    from ddi_hw.models.resnet import BasicBlock
    from ddi_hw.models.sparse_ops import take_samples
    torch.manual_seed(7)
    blk = BasicBlock(32, 32, 1, layer_gate=False, channel_gate=None).eval()
    for bn in (blk.bn1, blk.bn2):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    h = torch.randn(5, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    ex = torch.tensor([4, 1, 2][:n_run])
    with torch.no_grad():
        want = h.clone()
        want[ex] = blk(h[ex])
        hx = take_samples(h, ex)
        assert hx.is_contiguous(memory_format=torch.channels_last) and torch.equal(hx, h[ex])
        got = blk.sparse(hx, None, into=(h, ex))
    assert got is h
    assert torch.allclose(h, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(h[[i for i in range(5) if i not in ex.tolist()]],
                       want[[i for i in range(5) if i not in ex.tolist()]])
