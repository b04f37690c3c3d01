"""Export round trip, manifest validation, and bundle inference (reference vs float model, csim
vs reference) on a tiny gated ResNet-14 with random weights and non-trivial BN statistics."""
import json
import shutil

import numpy as np
import pytest
import torch

from ddi_hw.deploy.backends import CsimBackend, ReferenceBackend, run_image
from ddi_hw.deploy.bundle import DIGEST_KEY, ENGINE_BLOB, MANIFEST, PROC_BLOB, load_bundle, manifest_digest
from ddi_hw.deploy.fixedpoint import quantize
from ddi_hw.errors import UserError
from ddi_hw.export import export_model
from ddi_hw.models import create_model
from ddi_hw.models.sparse_ops import fold_bn

N_IMAGES = 24
AGREEMENT = 0.9  # stated rate: quantised predictions agree with the float sparse model on >= 90%


def gated_model(seed=0, kind="cnn", name="resnet14"):
    """Layer gates that really decide (about half the skippable blocks skipped) and channel gates
    that close about half the channels; BN statistics and affines not at their defaults."""
    from ddi_hw.models.gates import LayerGateEmbed

    torch.manual_seed(seed)
    m = create_model(name, layer_gates=True, channel_gates=True, channel_gate_kind=kind, exits=True)
    with torch.no_grad():
        for name_, mod in m.named_modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.1)
            elif isinstance(mod, LayerGateEmbed):
                mod.conv.weight.normal_(0, 3.0)
            elif name_.endswith("cgate"):
                mod.fc.bias.normal_(0, 0.3)
        m.layer_gate.proj.weight.normal_(0, 3.0)
        m.eval()
        s = m.input_size
        p = m(torch.randn(32, 3, s, s, generator=torch.Generator().manual_seed(9))).layer_probs
        m.layer_gate.proj.bias -= torch.logit(p.double()).median().float()  # about half the blocks skip
    return m


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    m = gated_model()
    x = torch.randn(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = export_model(m, tmp_path_factory.mktemp("bundle"), x[:16])
    return m, x, path


def test_round_trip_layers_are_folded_quantised_weights(exported):
    m, _, path = exported
    b = load_bundle(path)
    names = [l.name for l in b.layers]
    # CNN channel-gate convs and exit-branch convs run on the engine too
    backbone = [n for n in names if ".cgate." not in n and not n.startswith("exits.")]
    assert names[0] == "stem.conv" and names.count("blocks.2.sc_conv") == 1 and len(backbone) == 1 + 6 * 2 + 2
    assert [n for n in names if ".cgate." in n] == [f"blocks.{j}.cgate.conv" for j in range(6)]
    assert [n for n in names if n.startswith("exits.")] == \
        [f"exits.{i}.conv{k}" for i in range(len(m.exits)) for k in (1, 2)]
    l = b.layers[names.index("blocks.3.conv1")]
    w, bias = fold_bn(m.blocks[3].conv1.weight, m.blocks[3].bn1)
    np.testing.assert_array_equal(l.weights, quantize(w.double().numpy(), l.f_w))
    np.testing.assert_array_equal(l.bias, quantize(bias.double().numpy(), l.f_in + l.f_w, -2**31, 2**31 - 1, np.int32))
    assert np.abs(l.weights / 2.0 ** l.f_w - w.numpy()).max() <= 2.0 ** -(l.f_w + 1) + 1e-9
    assert l.params.acc_shift == l.f_in + l.f_w - l.f_out
    man = json.loads((path / MANIFEST).read_text())
    # a skippable block's output keeps its input's Q format (identity when skipped)
    assert man["tensors"]["b1.out"]["frac"] == man["tensors"]["b0.out"]["frac"] == man["tensors"]["stem"]["frac"]
    assert all(e["weights"]["offset"] % 64 == 0 for e in man["layers"])
    assert set(b.processor) >= {"layer_gate.lstm.weight_ih", "fc.weight", "exits.0.fc.weight"}
    assert "exits.0.conv1.weight" not in b.processor  # in engine.bin (the exit's conv1 launch)


def test_reference_agrees_with_float_model(exported):
    m, x, path = exported
    b = load_bundle(path)
    with torch.no_grad():
        out = m(x, mode="sparse")
    ref = ReferenceBackend()
    agree = same_decisions = 0
    skipped = []
    for i in range(N_IMAGES):
        r = run_image(b, x[i].numpy(), ref)
        agree += r.prediction == int(out.logits[i].argmax())
        same = r.block_run == out.block_run[i].int().tolist() and all(
            np.array_equal(r.channel_masks.get(g, np.zeros(0)), out.channel_decisions[g][i].numpy().astype(np.uint8))
            for g in out.channel_decisions if r.block_run[int(g.split(".")[1])])
        same_decisions += same
        if same:  # same decisions -> logits differ only by 16-bit rounding
            assert np.abs(r.logits - out.logits[i].numpy()).max() < 1e-3
        skipped.append(len(r.block_run) - sum(r.block_run))
        assert r.iterations < r.dense_iterations  # channel/layer skipping shortens the engine loops
    assert agree / N_IMAGES >= AGREEMENT
    assert same_decisions / N_IMAGES >= AGREEMENT
    assert sum(skipped) > 0  # the test exercises layer skipping


@pytest.mark.parametrize("name,kind", [("densenet_tiny", "cnn"), ("densenet_tiny", "rnn"), ("resnet14", "rnn")])
def test_other_models_and_gates(tmp_path, name, kind):
    """DenseNet (input affine = folded BN-ReLU, concatenation, integer avg pool) and RNN channel
    gates: float agreement, skipping, and csim == reference on a whole image."""
    from ddi_hw.deploy.csim import toolchain_missing
    m = gated_model(seed=4, kind=kind, name=name)
    s = m.input_size
    x = torch.randn(12, 3, s, s, generator=torch.Generator().manual_seed(5))
    b = load_bundle(export_model(m, tmp_path / "b", x))
    with torch.no_grad():
        out = m(x, mode="sparse")
    rs = [run_image(b, x[i].numpy(), ReferenceBackend()) for i in range(len(x))]
    agree = np.mean([r.prediction == int(out.logits[i].argmax()) for i, r in enumerate(rs)])
    assert agree >= AGREEMENT
    assert any(0 in r.block_run for r in rs) and sum(r.iterations for r in rs) < sum(r.dense_iterations for r in rs)
    if name.startswith("densenet"):
        assert any(l.params.pre_affine for l in b.layers)
    if not toolchain_missing():
        c = run_image(b, x[0].numpy(), CsimBackend())
        np.testing.assert_array_equal(c.logits, rs[0].logits)
        assert c.iterations == rs[0].iterations


def test_csim_backend_bit_exact_with_reference(exported):
    from ddi_hw.deploy.csim import toolchain_missing
    if toolchain_missing():
        pytest.skip(toolchain_missing())
    _, x, path = exported
    b = load_bundle(path)
    for i in range(3):
        r = run_image(b, x[i].numpy(), ReferenceBackend())
        c = run_image(b, x[i].numpy(), CsimBackend())
        np.testing.assert_array_equal(r.logits, c.logits)
        assert r.iterations == c.iterations and r.block_run == c.block_run and r.launches == c.launches


def test_exit_branch_runs_on_processor(exported):
    """Exit 0 from the bundle vs the float model's exit 0 under the same gate decisions (forced)."""
    m, x, path = exported
    b = load_bundle(path)
    for i in range(4):
        r = run_image(b, x[i].numpy(), ReferenceBackend(), exit_at=0)
        assert r.exit_taken == 0 and r.launches < len(b.layers)
        run = r.block_run + [1] * (len(m.blocks) - len(r.block_run))  # blocks after the exit: unused
        force = {"layer": torch.tensor([[run[j] for j in m.skippable_idx]], dtype=torch.float32),
                 "channel": {g: torch.tensor(v[None], dtype=torch.float32) for g, v in r.channel_masks.items()}}
        with torch.no_grad():
            want = m(x[i:i + 1], mode="dense", force=force).exit_logits[0][0].numpy()
        assert np.abs(r.logits - want).max() < 1e-3


@pytest.mark.parametrize("frac", [None, 0.2, 0.5, 0.8])
def test_budgeted_exits_and_cost_match_float_model(exported, frac):
    """RADI: with a FLOPs budget the processor takes the same exit, with the same executed cost
    (from the exported cost plan), as the float model's sparse path."""
    m, x, path = exported
    b = load_bundle(path)
    budget = None if frac is None else frac * m.dense_cost("flops")
    with torch.no_grad():
        out = m(x[:8], mode="sparse", budget=budget)
    for i in range(8):
        r = run_image(b, x[i].numpy(), ReferenceBackend(), budget=budget)
        assert r.exit_taken == int(out.exit_taken[i])
        assert r.cost == pytest.approx(float(out.cost["flops"][i]), rel=1e-9)
        assert r.prediction == int(out.logits[i].argmax())
        if budget is not None:
            assert r.cost <= budget or r.exit_taken == 0


@pytest.fixture
def bundle_copy(exported, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(exported[2], dst)
    return dst


def _exit_step(man):
    return next(st for st in man["program"] if st["op"] == "exit")


def _edit_manifest(path, fn):
    """Edit and re-seal the manifest (recomputed digest), so the checks behind the digest are tested."""
    man = json.loads((path / MANIFEST).read_text())
    fn(man)
    man[DIGEST_KEY] = manifest_digest(man)
    (path / MANIFEST).write_text(json.dumps(man))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["layers"][3]["weights"].__setitem__("offset", 10 ** 7), "outside"),
    (lambda m: m["layers"][3]["bias"].__setitem__("offset", 65), "aligned"),
    (lambda m: m["layers"][2]["weights"].__setitem__("shape", [16, 16, 1, 1]), "shape"),
    (lambda m: m["layers"][2]["params"].__setitem__("acc_shift", 3), "shifts"),
    (lambda m: m.__setitem__("regmap_version", 999), "register-map version"),
    (lambda m: m["program"].append({"op": "format_disk"}), "unknown op"),
    (lambda m: m["program"][1].__setitem__("layer", 99), "layer 99"),
    (lambda m: m["program"][2].__setitem__("end", 1), "jumps"),  # a loop back would never end
    (lambda m: m["processor_shapes"].__setitem__("fc.weight", [3, 3]), "fc.weight"),
    # bundles of the previous formats (/3: exit branches on the processor in float; /4: an exit's max
    # pools as successive 2x2 passes; /5: no skip-only cost `s`, pooled sums charged to the gates) are
    # refused by name
    (lambda m: m.__setitem__("format", "ddi-hw-bundle/3"),
     r"format 'ddi-hw-bundle/3', expected 'ddi-hw-bundle/6'; re-export"),
    (lambda m: m.__setitem__("format", "ddi-hw-bundle/4"),
     r"format 'ddi-hw-bundle/4', expected 'ddi-hw-bundle/6'; re-export"),
    (lambda m: m.__setitem__("format", "ddi-hw-bundle/5"),
     r"format 'ddi-hw-bundle/5', expected 'ddi-hw-bundle/6'; re-export"),
    (lambda m: next(e for e in m["cost_plan"]["events"] if e["kind"] == "block").pop("s"),
     "cost_plan is malformed"),  # a /5 plan relabelled /6
    (lambda m: _exit_step(m).__setitem__("pool", 3), r"bad max-pool window 3 \(a power of two, 1..256\)"),
    (lambda m: _exit_step(m).pop("pool"), "bad max-pool window None"),  # a /4 step (`pools`) relabelled /5
    (lambda m: _exit_step(m).__setitem__("layer", 0),
     r"exit branch's engine layer 0 is 'stem.conv', not exits.0.conv1"),
    (lambda m: _exit_step(m).pop("pooled"), "no declared `pooled` tensor"),
])
def test_manifest_validation(bundle_copy, edit, match):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(UserError, match=match):
        load_bundle(bundle_copy)


def test_blob_hash_truncation_and_missing(bundle_copy):
    blob = bundle_copy / ENGINE_BLOB
    good = blob.read_bytes()
    data = bytearray(good)
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_bundle(bundle_copy)
    blob.write_bytes(bytes(data[:-10]))
    with pytest.raises(UserError, match="truncated"):
        load_bundle(bundle_copy)
    blob.write_bytes(good)
    load_bundle(bundle_copy)  # restored: loads again
    (bundle_copy / PROC_BLOB).unlink()
    with pytest.raises(UserError, match="missing"):
        load_bundle(bundle_copy)
    with pytest.raises(UserError, match="not found"):
        load_bundle(bundle_copy / "nope")


def test_cli_export_then_run_from_checkpoint(tmp_path):
    """The user-story path: run directory -> `ddi-hw export` -> `ddi-hw run --backend csim/reference`."""
    import subprocess
    import sys

    import pandas as pd

    from ddi_hw.checkpoint import save_model
    from ddi_hw.deploy.csim import toolchain_missing

    m = gated_model(seed=2)
    kwargs = {"name": "resnet14", "num_classes": 10, "layer_gates": True, "channel_gates": True,
              "channel_gate_kind": "cnn", "exits": True, "exit_positions": None}
    save_model(tmp_path / "run", m, {"config": {"dataset": "smoke"}, "model": kwargs})
    from typer.testing import CliRunner

    from ddi_hw.cli import app
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"),
                              "--calib", "32", "--eval-limit", "12"])
    assert res.exit_code == 0, res.output
    assert "drop" in res.output and "agreement" in res.output
    summary = json.loads((tmp_path / "bundle" / "quantization_summary.json").read_text())
    assert summary["images"] == 12 and summary["agreement_with_float"] >= AGREEMENT
    backend = "reference" if toolchain_missing() else "csim"
    res = runner.invoke(app, ["run", str(tmp_path / "bundle"), "--backend", backend, "--limit", "3"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "bundle" / f"run_{backend}.csv")
    ref = pd.read_csv(tmp_path / "bundle" / "quantization_report.csv").head(3)
    assert df.prediction.tolist() == ref.prediction.tolist() and df.iterations.tolist() == ref.iterations.tolist()
    cli = [sys.executable, "-m", "ddi_hw.cli"]
    # bad input: one line, exit code 2, no traceback
    res = subprocess.run(cli + ["run", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_export_deploy_folder_runs_on_its_own(tmp_path):
    """`ddi-hw export RUN --deploy DIR`: bundle + test images/labels .npy + validate.py + README in one
    folder; validate.py (a fresh interpreter, torch blocked) reproduces the exporter's own reference
    predictions; without the overlay files the board backend says so on one line, exit 2."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from ddi_hw.checkpoint import save_model
    from ddi_hw.cli import app

    m = gated_model(seed=3)
    kwargs = {"name": "resnet14", "num_classes": 10, "layer_gates": True, "channel_gates": True,
              "channel_gate_kind": "cnn", "exits": True, "exit_positions": None}
    save_model(tmp_path / "run", m, {"config": {"dataset": "smoke"}, "model": kwargs})
    d = tmp_path / "deploy"
    res = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--deploy", str(d), "--calib", "16",
                                   "--eval-limit", "6"])
    assert res.exit_code == 0, res.output
    assert "no overlay yet" in res.output
    x, y = np.load(d / "test_images.npy"), np.load(d / "test_labels.npy")
    assert x.shape == (6, 3, 32, 32) and y.shape == (6,)
    load_bundle(d)
    block = "import sys\nfor m in ['torch', 'scalesim', 'pandas', 'pyarrow', 'sklearn']: sys.modules[m] = None\n"
    code = block + ("sys.argv = ['validate.py', *sys.argv[1:]]\nimport runpy\n"
                    f"runpy.run_path({str(d / 'validate.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "--backend", "reference"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "per-image cost" in r.stdout
    got = [line.split(",") for line in (d / "run_reference.csv").read_text().splitlines()]
    want = [line.split(",") for line in (d / "quantization_report.csv").read_text().splitlines()]
    col_g, col_w = got[0].index("prediction"), want[0].index("prediction")
    assert [g[col_g] for g in got[1:]] == [w[col_w] for w in want[1:]]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "ddi_engine.bit and ddi_engine.hwh not in" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--calib", "16"])
    assert res.exit_code != 0
