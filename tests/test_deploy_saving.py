"""`ddi-hw run`'s two savings use one reference: the static network (every block and channel on, no
gates, no exits), with the gates' cost counted as executed. On a ResNet-14 with layer gates and
CNN channel gates, decisions forced all-on and forced skip (gate biases), each saving is checked
against an independent count, the cost-plan saving against the float model's table saving, and
the two against each other."""
import numpy as np
import pytest
import torch

from ddi_hw.deploy.backends import ReferenceBackend, run_images, static_cost, static_iterations, summarize
from ddi_hw.deploy.bundle import load_bundle
from ddi_hw.deploy.csim import expected_iterations
from ddi_hw.export import export_model
from ddi_hw.models import create_model

N = 4


def forced_model(skip: bool):
    """All-on: every gate opens. Skip: every skippable block is skipped and the other blocks'
    channel gates keep the first half of their channels."""
    torch.manual_seed(0)
    m = create_model("resnet14", layer_gates=True, channel_gates=True, channel_gate_kind="cnn", exits=True)
    with torch.no_grad():
        m.layer_gate.proj.weight.zero_()
        m.layer_gate.proj.bias.fill_(-50.0 if skip else 50.0)
        for b in m.blocks:
            fc = b.cgate.fc
            fc.weight.zero_()
            n = fc.bias.numel()
            fc.bias.copy_(torch.where(torch.arange(n) < (n // 2 if skip else n), 50.0, -50.0))
    return m.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["all-on", "skip"])
def case(request, tmp_path_factory):
    m = forced_model(request.param)
    x = torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    b = load_bundle(export_model(m, tmp_path_factory.mktemp("bundle"), x))
    rows = run_images(b, x.numpy(), np.zeros(N, int), ReferenceBackend(), progress=False)
    return request.param, m, x, b, rows, summarize(rows, static_cost(b.manifest["cost_plan"]))


def _iters(spec, n_in=None, n_out=None):
    return expected_iterations(spec.in_ch if n_in is None else n_in, spec.out_ch if n_out is None else n_out,
                               spec.out_h, spec.out_w, spec.kernel_h)


def test_iteration_saving_equals_an_independent_count(case):
    skip, m, _, b, rows, summary = case
    specs = {s.name: s for s in m.specs()}
    static = _iters(specs["stem.conv"])
    executed = static
    for j, blk in enumerate(m.blocks):
        convs = ["conv1", "conv2"] + ([] if blk.skippable else ["sc_conv"])
        static += sum(_iters(specs[f"blocks.{j}.{c}"]) for c in convs)
        if skip and blk.skippable:
            continue  # skipped: neither its gate conv nor its convs run
        k = specs[f"blocks.{j}.conv1"].out_ch // (2 if skip else 1)
        executed += _iters(specs[f"blocks.{j}.cgate.conv"])  # the gate conv runs on the engine
        executed += _iters(specs[f"blocks.{j}.conv1"], n_out=k) + _iters(specs[f"blocks.{j}.conv2"], n_in=k)
        if not blk.skippable:
            executed += _iters(specs[f"blocks.{j}.sc_conv"])
    assert static_iterations(b) == static
    assert all(r["iterations"] == executed and r["dense_iterations"] == static for r in rows)
    assert summary["engine_iteration_saving"] == pytest.approx(1 - executed / static, abs=1e-12)
    if not skip:
        assert summary["engine_iteration_saving"] < 0  # nothing skipped: the gates' cost remains


def test_cost_saving_is_the_tables_saving_for_the_same_images(case):
    skip, m, x, _, _, summary = case
    with torch.no_grad():
        out = m(x, mode="sparse")
    dense = m.dense_cost("flops")
    table_saving = 1 - float(out.cost["flops"].mean()) / dense
    assert summary["cost_saving"] == pytest.approx(table_saving, rel=1e-9)
    if not skip:  # all on: exactly minus the gates' share of the static network
        gates = m.gate_overhead("flops")
        assert table_saving == pytest.approx(-(gates.layer_gate.sum() + gates.channel_gate.sum()) / dense, rel=1e-9)


def test_the_two_savings_agree_up_to_what_the_engine_does_not_run(case):
    """Same reference, same decisions: the savings differ only by the metric. FLOPs also count the
    processor's work (gate FCs and LSTM, the classifier) and the engine's iterations count whole
    channel tiles (the stem's 3 input channels fill a TILE_IN=8 tile)."""
    skip, *_, summary = case
    assert summary["engine_iteration_saving"] == pytest.approx(summary["cost_saving"], abs=0.03)  # seen: 0.006, 0.019
    assert (summary["engine_iteration_saving"] > 0) == (summary["cost_saving"] > 0) == skip


def test_an_early_exit_is_measured_against_the_whole_static_network(case):
    *_, b, _, _ = case
    r = run_images(b, np.zeros((1, 3, 32, 32), np.float32), np.zeros(1, int), ReferenceBackend(),
                   exit_at=0, progress=False)[0]
    assert r["exit_taken"] == 0 and r["dense_iterations"] == static_iterations(b) > r["iterations"]
