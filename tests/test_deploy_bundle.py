"""The board side without torch: a hand-built bundle through write_bundle / load_bundle / run_image,
tampered bundles refused before anything runs, and `ddi-hw run` with the workstation stack blocked.

Torch-free on purpose: .ci/run also runs this file in the second venv that has no torch, scalesim,
pandas, pyarrow or scikit-learn (the board's situation)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ddi_hw.deploy.backends import ReferenceBackend, run_image
from ddi_hw.deploy.bundle import (
    DIGEST_KEY,
    ENGINE_BLOB,
    MANIFEST,
    load_bundle,
    manifest_digest,
    sha256_file,
    write_bundle,
)
from ddi_hw.deploy.fixedpoint import LayerParams, conv_layer, dequantize, quantize
from ddi_hw.errors import UserError

F_X, F_W = 8, 10  # Q formats: activations Q8, weights Q10 (acc_shift = F_X + F_W - F_X)
BLOCKED = ["torch", "scalesim", "pandas", "pyarrow", "sklearn"]


def _build(path, seed=0):
    """x (3ch) -> conv0 -> a (4ch) -> conv1 -> b -> conv2 -> c -> head (fc 4 -> 5)."""
    rng = np.random.default_rng(seed)
    layers, arrays = [], []
    for i, cin in enumerate((3, 4, 4)):
        p = LayerParams(kernel=3, stride=1, relu=True, residual=False, acc_shift=F_W)
        layers.append({"name": f"conv{i}", "in_ch": cin, "out_ch": 4, "params": p.as_dict(), "f_in": F_X,
                       "f_act": F_X, "f_w": F_W, "f_out": F_X, "f_res": None})
        arrays.append({"weights": rng.integers(-300, 300, (4, cin, 3, 3)).astype(np.int16),
                       "bias": rng.integers(-2000, 2000, 4).astype(np.int32)})
    t = ["x", "a", "b", "c"]
    program = [{"op": "input", "out": "x"}] + [
        {"op": "conv", "layer": i, "in": t[i], "out": t[i + 1], "residual": None} for i in range(3)] + [
        {"op": "head", "in": "c", "prefix": "fc"}]
    proc = {"fc.weight": rng.normal(size=(5, 4)).astype(np.float32), "fc.bias": rng.normal(size=5).astype(np.float32)}
    tensors = {n: {"frac": F_X, "shape": [3 if n == "x" else 4, 6, 6]} for n in t}
    write_bundle(path, layers, arrays, proc, {"source": "test", "dataset": None, "program": program,
                                              "tensors": tensors, "model": {"input_size": 6}})
    return arrays, proc


def _by_hand(arrays, proc, image):
    """The same inference from the arrays, without the bundle machinery."""
    x = quantize(image, F_X)
    p = LayerParams(kernel=3, stride=1, relu=True, residual=False, acc_shift=F_W)
    for a in arrays:
        x = conv_layer(x, a["weights"], a["bias"], p)
    return proc["fc.weight"] @ dequantize(x, F_X).astype(np.float32).mean(axis=(1, 2)) + proc["fc.bias"]


def _reseal(path, fn):
    man = json.loads((path / MANIFEST).read_text())
    fn(man)
    man[DIGEST_KEY] = manifest_digest(man)
    (path / MANIFEST).write_text(json.dumps(man))


def test_hand_built_bundle_runs_like_the_arrays(tmp_path):
    arrays, proc = _build(tmp_path / "b")
    b = load_bundle(tmp_path / "b")
    img = np.random.default_rng(1).normal(size=(3, 6, 6)).astype(np.float32)
    r = run_image(b, img, ReferenceBackend())
    np.testing.assert_allclose(r.logits, _by_hand(arrays, proc, img), rtol=1e-6)
    assert r.launches == 3


def test_edited_manifest_is_refused(tmp_path):
    _build(tmp_path / "b")
    man = json.loads((tmp_path / "b" / MANIFEST).read_text())
    man["layers"][2]["weights"]["offset"] = man["layers"][1]["weights"]["offset"]  # runs fine without the digest
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(UserError, match="edited after export"):
        load_bundle(tmp_path / "b")


def test_overlapping_ranges_are_refused_even_with_a_valid_digest(tmp_path):
    _build(tmp_path / "b")
    _reseal(tmp_path / "b", lambda m: m["layers"][2]["weights"].__setitem__(
        "offset", m["layers"][1]["weights"]["offset"]))
    with pytest.raises(UserError, match="overlaps"):
        load_bundle(tmp_path / "b")
    _build(tmp_path / "c")  # a partial overlap: bias of layer 0 moved into its weights
    _reseal(tmp_path / "c", lambda m: m["layers"][0]["bias"].__setitem__("offset", 64))
    with pytest.raises(UserError, match="overlaps"):
        load_bundle(tmp_path / "c")


def test_gate_engine_layer_must_exist(tmp_path):
    _build(tmp_path / "b")
    gate = {"prefix": "fc", "kind": "cnn", "layer": 7}

    def add_block(m):
        m["program"].insert(1, {"op": "block", "index": 0, "in": "x", "out": "x", "end": 2, "channel_gate": gate})
    _reseal(tmp_path / "b", add_block)
    with pytest.raises(UserError, match="engine layer 7 does not exist"):
        load_bundle(tmp_path / "b")


def test_replaced_blob_with_recomputed_hashes_is_refused(tmp_path):
    arrays, _ = _build(tmp_path / "b")
    blob = bytearray((tmp_path / "b" / ENGINE_BLOB).read_bytes())
    blob[:arrays[0]["weights"].nbytes] = np.zeros_like(arrays[0]["weights"]).tobytes()
    (tmp_path / "b" / ENGINE_BLOB).write_bytes(bytes(blob))
    man = json.loads((tmp_path / "b" / MANIFEST).read_text())
    man["blobs"][ENGINE_BLOB]["sha256"] = sha256_file(tmp_path / "b" / ENGINE_BLOB)  # hashes match the new blob
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(UserError, match="edited after export"):
        load_bundle(tmp_path / "b")


def _cli(args, cwd):
    """`ddi-hw ARGS` in a fresh interpreter in which the workstation stack cannot be imported."""
    code = (f"import sys\nfor m in {BLOCKED!r}: sys.modules[m] = None\n"
            "from ddi_hw.cli import main\nsys.argv = ['ddi-hw', *sys.argv[1:]]\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_run_without_torch_and_refusals(tmp_path):
    arrays, proc = _build(tmp_path / "b")
    x = np.random.default_rng(2).normal(size=(4, 3, 6, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    np.save(tmp_path / "b" / "test_images.npy", x)
    np.save(tmp_path / "b" / "test_labels.npy", y)
    res = _cli(["run", str(tmp_path / "b"), "--backend", "reference"], tmp_path)
    assert res.returncode == 0, res.stderr
    want = [int(np.argmax(_by_hand(arrays, proc, img))) for img in x]
    lines = (tmp_path / "b" / "run_reference.csv").read_text().splitlines()
    col = lines[0].split(",").index("prediction")
    assert [int(row.split(",")[col]) for row in lines[1:]] == want
    assert json.loads(res.stdout[:res.stdout.rindex("}") + 1])["accuracy"] == np.mean(np.array(want) == y)
    # a workstation command says what is missing, on one line
    res = _cli(["profile", "--arch", "resnet14"], tmp_path)
    assert res.returncode == 2 and "torch" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # tampered: one line, exit 2, nothing run (no CSV written)
    (tmp_path / "b" / "run_reference.csv").unlink()
    man = json.loads((tmp_path / "b" / MANIFEST).read_text())
    man["program"].pop(2)
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(man))
    res = _cli(["run", str(tmp_path / "b")], tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "edited" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "b" / "run_reference.csv").exists()


def test_deploy_imports_only_the_board_stack():
    """Module-level imports of ddi_hw/deploy: standard library, numpy, yaml, safetensors, the package
    itself, ddi_hw.errors, ddi_hw.validate and energy_models' stdlib-only helpers; inside functions also pynq (the board
    backend), energy_models.engine (the engine constants regmap.h is generated from) and ddi_hw.data
    (images from a data set, workstation only). No cycle back into ddi_hw."""
    import ast
    from pathlib import Path

    allowed = {"numpy", "yaml", "safetensors", "ddi_hw.deploy", "ddi_hw.errors", "ddi_hw.validate",
               "energy_models.errors", "energy_models.atomic"}
    lazy_allowed = allowed | {"pynq", "ddi_hw.data", "energy_models.engine"}  # engine: yaml + stdlib
    root = Path(__file__).resolve().parents[1] / "ddi_hw" / "deploy"
    for f in sorted(root.glob("*.py")):
        tree = ast.parse(f.read_text())
        top = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in sys.stdlib_module_names or name == "__future__":
                    continue
                ok = allowed if id(node) in top else lazy_allowed
                assert any(name == a or name.startswith(a + ".") for a in ok), f"{f.name} imports {name}"
