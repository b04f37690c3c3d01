"""The C gate kernels (`ddi_hw/models/_gatekernels.c`) are an optional build: without them (no C
compiler at install) the sparse path runs the same gate math as torch ops. Both must give the same
decisions, logits, costs and LSTM state. The extension's side needs it built (CI checks that it is)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddi_hw.models import create_model, gates, sparse_ops

HERE = Path(__file__).resolve()
needs_ext = pytest.mark.skipif(not sparse_ops.FUSED, reason="the C gate kernels are not built here")

# (arch, kwargs, input size): the LSTM layer gate's kernel (ResNet: feature maps; DenseNet: pooled
# means) and the CNN channel gate's kernel
MODELS = [("resnet20", {"layer_gates": True, "channel_gates": True, "channel_gate_kind": "cnn"}, 32),
          ("densenet_tiny", {"layer_gates": True}, 16)]


def deciding(name, kw, size):
    """A model whose gates decide both ways: channel-gate biases zero, sharp layer-gate weights and
    the layer gate's bias at the median logit of its first block (as tests/test_sparse_equivalence)."""
    torch.manual_seed(0)
    model = create_model(name, **kw).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.2
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    model.layer_gate.proj.bias.data.zero_()
    model.layer_gate.proj.weight.data.mul_(20)
    for gname in model.gate_widths:
        model.get_submodule(gname).fc.bias.data.zero_()
    with torch.no_grad():
        first = torch.logit(model(torch.randn(8, 3, size, size, generator=g)).layer_probs[:, 0].double())
        model.layer_gate.proj.bias.data.fill_(-float(first.median()))
    return model


def outputs() -> dict[str, np.ndarray]:
    """Sparse-path outputs of every model in MODELS at batch 1 (x3) and batch 8."""
    res = {}
    for name, kw, size in MODELS:
        model = deciding(name, kw, size)
        g = torch.Generator().manual_seed(2)
        for i, n in enumerate((1, 1, 1, 8)):
            out = model(torch.randn(n, 3, size, size, generator=g), mode="sparse")
            key = f"{name}.{i}"
            res[f"{key}.logits"] = out.logits.numpy()
            res[f"{key}.layer"] = out.layer_decisions.numpy()
            res[f"{key}.flops"] = out.cost["flops"].numpy()
            for gname, d in out.channel_decisions.items():
                res[f"{key}.{gname}"] = d.numpy()
    return res


CHILD = """
import importlib.abc, sys
import numpy as np

class NoKernels(importlib.abc.MetaPathFinder):  # as after an install without a C compiler
    def find_spec(self, name, path, target=None):
        if name == "ddi_hw.models._gatekernels":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoKernels())
import runpy
ns = runpy.run_path(sys.argv[1])
from ddi_hw.models import gates, sparse_ops
assert sparse_ops._gatekernels is None and not sparse_ops.FUSED and not gates.FUSED
np.savez(sys.argv[2], **ns["outputs"]())
"""


@needs_ext
def test_models_without_kernels_match_the_extension(tmp_path):
    """A fresh interpreter where the extension cannot be imported (the compiler-less install)
    gives the extension's decisions, costs and logits, at batch 1 and 8."""
    subprocess.run([sys.executable, "-c", CHILD, str(HERE), str(tmp_path / "torch.npz")], check=True)
    without = np.load(tmp_path / "torch.npz")
    with_ext = outputs()
    assert sorted(without.files) == sorted(with_ext)
    for k, v in with_ext.items():
        if k.endswith(".logits"):
            np.testing.assert_allclose(without[k], v, atol=1e-4, rtol=1e-4, err_msg=k)
        else:
            np.testing.assert_array_equal(without[k], v, err_msg=k)
    layer = np.concatenate([v.ravel() for k, v in with_ext.items() if k.endswith(".layer")])
    chan = np.concatenate([v.ravel() for k, v in with_ext.items() if ".blocks." in k])
    assert 0 < layer.mean() < 1 and 0 < chan.mean() < 1  # gates really decided both ways


@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice", "pooled"])
def test_lstm_step_without_kernel_matches(layout, monkeypatch):
    """`fused_step`'s torch form keeps the kernel's [h | c] numpy state and logits over 4 steps."""
    torch.manual_seed(0)
    gate, embed = gates.SharedLSTMGate(), gates.LayerGateEmbed(24)
    torch.nn.init.normal_(gate.proj.weight)
    s_ext = s_torch = None
    for _ in range(4):
        x = torch.randn(3, 32, 6, 5)[:, :24] if layout == "channel_slice" else torch.randn(3, 24, 6, 5)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        if layout == "pooled":
            x = x.mean((2, 3))
        got_ext, s_ext = gate.fused_step(x, embed, s_ext)
        with monkeypatch.context() as m:
            m.setattr(gates, "FUSED", False)
            got_torch, s_torch = gate.fused_step(x, embed, s_torch)
        np.testing.assert_allclose(got_torch, got_ext, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(s_torch, s_ext, atol=1e-5, rtol=1e-5)
    assert s_ext.dtype == s_torch.dtype == np.float32 and s_torch.shape == (3, 20)
