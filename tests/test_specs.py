"""Layer specs from real forward passes, checked against MAC counts worked out by hand.

The reference CIFAR ResNet and DenseNet-BC are built here (independently of ddi_hw.models) so the
hand formulas test the tracer, not another builder; ddi_hw.models is checked too when present.
"""
import pytest
import torch
from torch import nn

from ddi_hw.errors import UserError
from energy_models.specs import LayerSpec, extract_specs


# ----------------------------------------------------------------- reference models (plain torch)
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, shortcut="A"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        self.pad = 0
        if stride != 1 or cin != cout:
            if shortcut == "B":
                self.down = nn.Conv2d(cin, cout, 1, stride, bias=False)
            else:
                self.pad = cout - cin

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.down is not None:
            idt = self.down(x)
        elif self.pad:
            idt = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
        else:
            idt = x
        return torch.relu(out + idt)


class CifarResNet(nn.Module):
    def __init__(self, depth, shortcut="A", num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1, shortcut))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.pool(self.blocks(x)).flatten(1)
        return self.fc(x)


def resnet_macs_by_hand(depth, shortcut="A"):
    n = (depth - 2) // 6
    full = 3 * 3 * 16 * 16 * 32 * 32  # every 3x3 conv after the stem has this many MACs
    half = full // 2  # first conv of stages 2 and 3 (stride 2, half the input channels)
    macs = 32 * 32 * 16 * 3 * 9 + 2 * n * full + 2 * (half + (2 * n - 1) * full) + 64 * 10
    if shortcut == "B":
        macs += 16 * 16 * 32 * 16 + 8 * 8 * 64 * 32
    return macs


class Bottleneck(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class DenseNetBC(nn.Module):
    def __init__(self, blocks, growth, imagenet=False, num_classes=10):
        super().__init__()
        c = 2 * growth
        if imagenet:
            self.stem = nn.Sequential(nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        feats = []
        for b, nl in enumerate(blocks):
            for _ in range(nl):
                feats.append(Bottleneck(c, growth))
                c += growth
            if b < len(blocks) - 1:
                feats += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                          nn.AvgPool2d(2)]
                c //= 2
        self.features = nn.Sequential(*feats)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.features(self.stem(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def densenet_macs_by_hand(blocks, growth, size, imagenet=False, num_classes=10):
    c = 2 * growth
    if imagenet:
        s = size // 2
        macs = s * s * c * 3 * 49
        s //= 2
    else:
        s = size
        macs = s * s * c * 3 * 9
    for b, nl in enumerate(blocks):
        for _ in range(nl):
            macs += s * s * 4 * growth * c + s * s * growth * 4 * growth * 9
            c += growth
        if b < len(blocks) - 1:
            macs += s * s * (c // 2) * c
            c //= 2
            s //= 2
    return macs + c * num_classes


def conv_linear_macs(specs):
    return sum(s.macs for s in specs if s.kind in ("conv", "linear"))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("depth", [20, 38, 74, 110])
def test_cifar_resnet_macs_match_hand_formula(depth):
    specs = extract_specs(CifarResNet(depth), (1, 3, 32, 32))
    assert conv_linear_macs(specs) == resnet_macs_by_hand(depth)
    n = (depth - 2) // 6
    assert sum(s.kind == "conv" for s in specs) == 1 + 6 * n
    assert sum(s.kind == "add" for s in specs) == 3 * n  # one residual add per block
    assert [s.kind for s in specs].count("pool") == 1


def test_resnet74_is_about_170M_macs_like_the_paper():
    macs = conv_linear_macs(extract_specs(CifarResNet(74), (1, 3, 32, 32)))
    assert 160e6 < macs < 175e6  # paper: ~340 M FLOPs = 2 x MACs


def test_resnet_1x1_shortcut_and_conv_fields():
    specs = {s.name: s for s in extract_specs(CifarResNet(20, "B"), (1, 3, 32, 32))}
    assert conv_linear_macs(specs.values()) == resnet_macs_by_hand(20, "B")
    s = specs["blocks.3.conv1"]  # first block of stage 2
    assert (s.in_ch, s.out_ch, s.in_h, s.out_h, s.kernel_h, s.stride, s.padding) == (
        16, 32, 32, 16, 3, 2, 1)
    assert s.sim_input_hw() == (33, 33)  # SCALE-Sim rounds its output up: crop, not 34
    d = specs["blocks.3.down"]
    assert (d.kernel_h, d.stride, d.padding, d.out_h) == (1, 2, 0, 16)
    assert specs["blocks.0.conv1"].sim_input_hw() == (34, 34)  # padded 'same' 3x3
    assert specs["blocks.0.conv1"].block == "blocks.0"  # default block = parent module
    fc = specs["fc"]
    assert (fc.kind, fc.in_ch, fc.out_ch, fc.in_h, fc.macs) == ("linear", 64, 10, 1, 640)
    assert specs["blocks.0.add"].kind == "add" and specs["blocks.0.add"].macs == 16 * 32 * 32


def test_densenet_bc_100_cifar():
    specs = extract_specs(DenseNetBC((16, 16, 16), 12), (1, 3, 32, 32))
    assert conv_linear_macs(specs) == densenet_macs_by_hand((16, 16, 16), 12, 32)
    assert sum(s.kind == "conv" for s in specs) == 1 + 2 * 48 + 2
    pools = [s for s in specs if s.kind == "pool"]
    assert len(pools) == 3 and pools[0].kernel_h == 2 and pools[-1].out_h == 1
    assert sum(s.kind == "add" for s in specs) == 0  # concatenation costs no arithmetic


def test_densenet_201_imagenet():
    specs = extract_specs(DenseNetBC((6, 12, 48, 32), 32, imagenet=True, num_classes=1000),
                          (1, 3, 224, 224))
    macs = conv_linear_macs(specs)
    assert macs == densenet_macs_by_hand((6, 12, 48, 32), 32, 224, True, 1000)
    assert abs(macs / 4.29e9 - 1) < 0.02  # torchvision's published 4.29 GMACs for densenet201
    stem = specs[0]
    assert (stem.kernel_h, stem.stride, stem.padding, stem.out_h) == (7, 2, 3, 112)
    assert specs[1].kind == "pool" and specs[1].out_h == 56 and specs[1].kernel_h == 3


class SharedGateNet(nn.Module):
    """A SkipNet-style shared LSTM gate called once per block, annotated like a gated model."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, 1, 1) for _ in range(3))
        for i, c in enumerate(self.convs):
            c.ddi_block, c.ddi_layer_gate, c.ddi_out_gate = f"b{i}", "lgate", f"b{i}.cg"
        self.gate_proj = nn.Conv2d(8, 10, 1)
        self.gate_proj.ddi_role = "gate"
        self.lstm = nn.LSTM(10, 10)
        self.lstm.ddi_role = "gate"

    def forward(self, x):
        h = None
        for i, conv in enumerate(self.convs):
            self.lstm.ddi_block = self.gate_proj.ddi_block = f"b{i}"
            g = self.gate_proj(x).mean((2, 3))
            _, h = self.lstm(g.unsqueeze(0), h)
            x = x + conv(x)
        return x


def test_shared_modules_get_one_spec_per_call_with_the_calling_block():
    specs = extract_specs(SharedGateNet(), (1, 8, 8, 8))
    names = [s.name for s in specs]
    for i in range(3):
        assert f"lstm#{i}.ih" in names and f"lstm#{i}.hh" in names
        assert f"gate_proj#{i}" in names
    lstm1 = next(s for s in specs if s.name == "lstm#1.hh")
    assert (lstm1.block, lstm1.role, lstm1.kind, lstm1.in_ch, lstm1.out_ch) == (
        "b1", "gate", "linear", 10, 40)
    conv = next(s for s in specs if s.name == "convs.2")
    assert (conv.block, conv.layer_gate, conv.out_gate, conv.role) == ("b2", "lgate", "b2.cg",
                                                                      "backbone")
    assert sum(s.kind == "pool" for s in specs) == 3  # the spatial means
    assert len(names) == len(set(names))


def test_bad_input_shape_is_a_user_error():
    with pytest.raises(UserError):
        extract_specs(CifarResNet(20), (1, 3, 0, 32))


def test_macs_at_scales_with_active_channels():
    s = LayerSpec("c", "conv", 16, 32, 32, 32, 32, 32, 3, 3, 1, 1)
    assert s.macs_at(32, 16) == s.macs and s.macs_at(5, 16) == 32 * 32 * 5 * 16 * 9
    assert s.macs_at(32, 4) == 32 * 32 * 32 * 4 * 9


def _create(name, **kw):
    from ddi_hw.models import create_model

    return create_model(name, **kw)


@pytest.mark.parametrize("name, hands", [
    ("resnet20", {resnet_macs_by_hand(20, "A"), resnet_macs_by_hand(20, "B")}),
    ("resnet74", {resnet_macs_by_hand(74, "A"), resnet_macs_by_hand(74, "B")}),
    ("densenet100", {densenet_macs_by_hand((16, 16, 16), 12, 32)})])
def test_ddi_hw_models_backbone_macs(name, hands):
    specs = extract_specs(_create(name), (1, 3, 32, 32))
    backbone = [s for s in specs if s.role == "backbone" and s.kind in ("conv", "linear")]
    assert sum(s.macs for s in backbone) in hands  # identity or 1x1-conv shortcuts


def test_ddi_hw_gated_model_traces_gates_exits_and_shared_lstm():
    specs = extract_specs(_create("resnet20", layer_gates=True, channel_gates=True, exits=True),
                          (1, 3, 32, 32))
    roles = {s.role for s in specs}
    assert roles == {"backbone", "gate", "exit"}
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    convs = [s for s in specs if s.role == "backbone" and s.kind == "conv" and s.layer_gate]
    assert convs and all(s.block for s in convs)
    assert any(s.out_gate for s in convs) and any(s.in_gate for s in convs)
