"""The gate-kind registry: torch modules and the processor's numpy forwards agree, and every
module that needs a gate fact gets it from the registry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddi_hw.deploy.processor import GATE_OPS
from ddi_hw.models import create_model
from ddi_hw.models.gates import GATE_KINDS, LAYER_GATE, channel_gate_kind, gate_module_classes


def test_both_halves_name_the_same_kinds():
    assert {k.deploy for k in GATE_KINDS.values()} == set(GATE_OPS)
    for k in GATE_KINDS.values():
        assert GATE_OPS[k.deploy].shared == k.shared, k.name
        assert (k.make_shared is None) == (k.shared is None), k.name


@pytest.mark.parametrize("name", sorted(GATE_KINDS))
def test_numpy_forward_of_every_kind_matches_the_torch_gate(name):
    """Three gates of one kind in a row (the shared LSTM carries its state): same logits."""
    torch.manual_seed(1)
    kind = GATE_KINDS[name]
    c_in, width, growth = 8, 12, 4
    gates = [kind.build(c_in, width, growth) for _ in range(3)]
    shared = kind.make_shared() if kind.make_shared else None
    tensors = {}
    for i, g in enumerate(gates):
        tensors |= {f"g{i}.{k}": v.detach().numpy() for k, v in g.state_dict().items()}
    if shared is not None:
        tensors |= {f"{kind.shared}.{k}": v.detach().numpy() for k, v in shared.state_dict().items()}
    op = GATE_OPS[kind.deploy]
    xs = [torch.randn(1, c_in, 8, 8) for _ in gates]
    t_state = shared.init_state(1, xs[0]) if shared is not None else None
    n_state = None
    for i, (g, x) in enumerate(zip(gates, xs)):
        with torch.no_grad():
            if kind.role == "layer":
                t_state = shared.step(g(x), t_state)
                want = shared.logit(t_state[0])
            else:
                want, t_state = g(x, shared, t_state)
        assert set(op.keys(f"g{i}")) <= set(tensors)
        got, n_state = op.forward(tensors, f"g{i}", op.shared, x[0].numpy(), n_state)
        np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-4, atol=1e-5)


def test_families_build_their_kind_and_cost_roles_come_from_the_registry():
    assert channel_gate_kind("cnn", "resnet").name == "cnn"
    assert channel_gate_kind("cnn", "densenet").name == "dense_light"
    for arch, option in (("resnet14", "cnn"), ("resnet14", "rnn"), ("densenet_tiny", "cnn"), ("densenet_tiny", "rnn")):
        m = create_model(arch, layer_gates=True, channel_gates=True, channel_gate_kind=option)
        table = m.cost_table
        gate_rows = {n: r for n, r in table.rows.items() if r["role"] == "gate"}
        assert gate_rows and all(r["gate_kind"] in GATE_KINDS for r in gate_rows.values())
        # independent: a row belongs to a channel gate iff it comes from a `cgate` module or the shared channel LSTM
        # (the pooled sums a conv writes only for gates, `<conv>.sums`, are the engine's, not a gate module's)
        by_name = {n for n in gate_rows
                   if (".cgate." in n or n.startswith("channel_rnn.")) and not n.endswith(".sums")}
        by_kind = {n for n, r in gate_rows.items()
                   if GATE_KINDS[r["gate_kind"]].role == "channel" and r["kind"] != "sums"}
        assert by_name == by_kind
        plan = m.plan
        names = m.block_names
        # c: the block's channel gate, plus the pooled sums its convs write for gates (paid when it runs)
        sums = {n for n in gate_rows if n.endswith(".sums")}
        c_by_hand = [sum(table.dense(n) for n in by_name | sums if table.rows[n]["block"] == b) for b in names]
        assert np.allclose(plan.c["flops"].numpy(), c_by_hand)


def test_gate_parameters_are_the_gate_modules_parameters():
    from ddi_hw.train import gate_parameter_names

    m = create_model("resnet14", layer_gates=True, channel_gates=True, channel_gate_kind="rnn")
    by_name = {n for n, _ in m.named_parameters()
               if any(t in n.split(".") for t in ("lgate", "cgate", "layer_gate", "channel_rnn"))}
    assert gate_parameter_names(m) == by_name
    assert set(gate_module_classes()) >= {k.cls for k in GATE_KINDS.values()}
    assert LAYER_GATE.role == "layer"


def test_block_names_are_the_models_own_module_paths():
    """skip_blocks.csv labels: DenseNet layers are dense_blocks.b.i, not blocks.j."""
    for arch in ("resnet14", "densenet_tiny"):
        m = create_model(arch, layer_gates=True)
        modules = dict(m.named_modules())
        names = m.skippable_block_names
        assert len(names) == m.num_skippable
        assert all(n in modules and modules[n].skippable for n in names)
    assert create_model("densenet_tiny").skippable_block_names[0] == "dense_blocks.0.1"
