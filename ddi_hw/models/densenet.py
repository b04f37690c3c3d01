"""DenseNet-BC (Huang et al. 2017) with MGL2S gates and early exits.

- CIFAR DenseNet-BC-L (32x32, growth 12): 3x3 stem conv to 2k channels, three dense blocks of
  (L-4)/6 bottleneck layers (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k), transitions
  BN-ReLU-1x1 conv (compression 0.5)-2x2 avg pool, final BN-ReLU-pool-linear. L = 100 (paper),
  76/82/88 (Table II baselines), 40 (a CPU-sized net for the Fig. 12 comparison).
- DenseNet-201 (224x224, growth 32): 7x7/2 stem conv 64 + BN + ReLU + 3x3/2 max pool, dense
  blocks of 6/12/48/32 layers, same transitions and head (torchvision's layout).

Skipping semantics:
- Layer gate (paper Fig. 3): a skipped dense layer emits the same k new feature maps as the
  dense layer before it in its block, so concatenation sizes never change. The first layer of
  each dense block has no predecessor in the block and is never skipped; stem, transitions and
  head always run.
- Channel gate (light gate, Fig. 4, or the RNN variant): masks the 4k output channels of the
  layer's 1x1 bottleneck. A skipped channel is not computed and is exactly 0 after BN2 + ReLU,
  so the 3x3 conv reads only the active channels. (The dense layer's own output is concatenated,
  not added, so Eq. 2's pass-through has no counterpart inside the layer.)
- MGL2S: the channel gate is evaluated only when the layer gate says "run".

The sparse path keeps each dense block's features in one preallocated buffer (no repeated
concatenation), runs a dense layer only for the samples that execute it, copies the previous
layer's features for the others, folds BN2 into the 1x1 conv and slices the bottleneck channels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddi_hw.errors import UserError
from ddi_hw.models.base import DynamicNet, keep_rows
from ddi_hw.models.exits import ExitBranch, default_exit_positions
from ddi_hw.models.gates import LAYER_GATE, GateKind
from ddi_hw.models.registry import register_model
from ddi_hw.models.sparse_ops import FoldCache, fold_bn, module_tensors, run_channel_groups


def _bn_affine(bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale.detach(), (bn.bias - bn.running_mean * scale).detach()


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, skippable: bool, layer_gate: bool, channel_gate: GateKind | None,
                 bn_size: int = 4):
        super().__init__()
        width = bn_size * growth
        self.c_in, self.growth, self.width, self.skippable = c_in, growth, width, skippable
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth, 3, padding=1, bias=False)
        self.lgate = LAYER_GATE.build(c_in, width, growth) if layer_gate and skippable else None
        self.cgate = channel_gate.build(c_in, width, growth) if channel_gate else None
        self._fold = FoldCache()

    def forward(self, x, mask=None):
        h = F.relu(self.bn2(self.conv1(F.relu(self.bn1(x)))))
        if mask is not None:
            h = h * mask[:, :, None, None].to(h.dtype)
        return self.conv2(h)

    def _folded(self):
        def compute():
            s1, t1 = _bn_affine(self.bn1)
            w1, b1 = fold_bn(self.conv1.weight, self.bn2)
            return s1.view(1, -1, 1, 1), t1.view(1, -1, 1, 1), w1, b1, self.conv2.weight.detach()
        return self._fold.get(compute, lambda: module_tensors(self.bn1, self.conv1, self.bn2, self.conv2))

    def sparse(self, x, mask=None, max_groups: int = 8):
        s1, t1, w1, b1, w2 = self._folded()
        a = F.relu(torch.addcmul(t1, x, s1))
        if mask is None:
            return F.conv2d(F.relu(F.conv2d(a, w1, b1)), w2, None, 1, 1)
        return run_channel_groups(a, mask, lambda xs, ch, m: self._sliced(xs, ch, m, w1, b1, w2), max_groups)

    def _sliced(self, a, ch, m, w1, b1, w2):
        if len(ch) == 0:
            return a.new_zeros(a.shape[0], self.growth, a.shape[2], a.shape[3])
        if len(ch) < len(b1):
            w1, b1, w2 = w1.index_select(0, ch), b1.index_select(0, ch), w2.index_select(1, ch)
        h = F.relu_(F.conv2d(a, w1, b1))
        if m is not None:
            h = h * m[:, :, None, None]
        return F.conv2d(h, w2, None, 1, 1)


class Transition(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class Stem(nn.Module):
    def __init__(self, c_out: int, imagenet: bool):
        super().__init__()
        self.imagenet = imagenet
        if imagenet:
            self.conv = nn.Conv2d(3, c_out, 7, 2, 3, bias=False)
            self.bn = nn.BatchNorm2d(c_out)
        else:
            self.conv = nn.Conv2d(3, c_out, 3, 1, 1, bias=False)

    def forward(self, x):
        x = self.conv(x)
        if self.imagenet:
            x = F.max_pool2d(F.relu(self.bn(x)), 3, 2, 1)
        return x


class DenseNet(DynamicNet):
    """Gated DenseNet-BC; see the module docstring for the exact skipping semantics."""

    family = "densenet"

    def __init__(self, block_sizes, growth: int, num_classes: int = 10, imagenet: bool = False,
                 layer_gates: bool = False, channel_gates: bool = False, channel_gate_kind: str = "cnn",
                 exits: bool = False, exit_positions: list[int] | None = None, max_channel_groups: int = 8,
                 input_size: int = 32):
        super().__init__()
        self.input_size = input_size
        self.max_channel_groups = max_channel_groups
        self._choose_channel_gate(channel_gates, channel_gate_kind)
        c = 64 if imagenet else 2 * growth
        self.stem = Stem(c, imagenet)
        size = self.input_size // 4 if imagenet else self.input_size
        blocks, trans, sizes, chans = [], [], [], []
        for b, n in enumerate(block_sizes):
            layers = []
            for i in range(n):
                layers.append(DenseLayer(c + i * growth, growth, i > 0, layer_gates, self.channel_gate))
                sizes.append(size)
                chans.append(c + (i + 1) * growth)
            blocks.append(nn.ModuleList(layers))
            c += n * growth
            if b < len(block_sizes) - 1:
                trans.append(Transition(c, c // 2))
                c //= 2
                size //= 2
        self.dense_blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(trans)
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        self._build_shared_gates(layer_gates)
        total = sum(block_sizes)
        if exits:
            if exit_positions is None:
                exit_positions = default_exit_positions(list(block_sizes)) if not imagenet else \
                    densenet201_exit_positions(block_sizes)
            pos = sorted(exit_positions)
            self._check_exit_positions(pos, total, "dense-layer")
        else:
            pos = []
        self.exit_positions = pos
        target, width = (7, 128) if imagenet else (8, 64)
        self.exits = nn.ModuleList(ExitBranch(chans[p], sizes[p], num_classes, target, width) for p in pos)
        self.layers = [layer for blk in self.dense_blocks for layer in blk]  # flat view, not registered
        self._describe()
        self._build_default_table()

    def _describe(self) -> None:
        self._names = [f"dense_blocks.{b}.{i}" for b, blk in enumerate(self.dense_blocks) for i in range(len(blk))]
        self.block_skippable = [layer.skippable for layer in self.layers]
        self.skippable_idx = [j for j, s in enumerate(self.block_skippable) if s]
        self.num_skippable = len(self.skippable_idx)
        self.gate_widths = {f"{self._names[j]}.cgate": layer.width
                            for j, layer in enumerate(self.layers) if layer.cgate is not None}
        exit_at = {p: i for i, p in enumerate(self.exit_positions)}
        self.events, j = [("fixed", "stem")], 0
        for b, blk in enumerate(self.dense_blocks):
            for _ in blk:
                self.events.append(("block", self._names[j]))
                if j in exit_at:
                    self.events.append(("exit", f"exits.{exit_at[j]}"))
                j += 1
            if b < len(self.transitions):
                self.events.append(("fixed", f"transitions.{b}"))
        self.events.append(("fixed", "head"))
        ann = self._annotate
        for mod in (self, self.norm, self.fc):
            ann(mod, "head", "backbone")
        for m in self.stem.modules():
            ann(m, "stem", "backbone")
        for t, tr in enumerate(self.transitions):
            for m in tr.modules():
                ann(m, f"transitions.{t}", "backbone")
        for j, layer in enumerate(self.layers):
            self._annotate_gated_block(self._names[j], layer)
            # a skipped layer's features are the previous layer's, copied into its slot (Fig. 3):
            # the cost table prices that copy, paid only when the layer is skipped
            layer.conv2.ddi_skip = "copy" if layer.skippable else None
        self._annotate_shared_gates_and_exits()

    def _head(self, h):
        return self.fc(F.relu(self.norm(h)).mean((2, 3)))

    # ------------------------------------------------------------------ dense (training) path
    def _forward_dense(self, x, force):
        n = x.shape[0]
        h = self.stem(x)
        lstate = self.layer_gate.init_state(n, x) if self.layer_gate is not None else None
        cstate = self.channel_rnn.init_state(n, x) if self.channel_rnn is not None else None
        Lf, chf = force.get("layer"), force.get("channel", {})
        ones = x.new_ones(n)
        L_cols, p_cols, k_cols, channels, cprobs, exit_logits = [], [], [], {}, {}, []
        exit_at = {p: i for i, p in enumerate(self.exit_positions)}
        j = jb = 0
        for b, blk in enumerate(self.dense_blocks):
            feats, prev = [h], None
            for layer in blk:
                name = self._names[j]
                xin = torch.cat(feats, 1) if len(feats) > 1 else feats[0]
                Lj, pj, lstate, jb = self._dense_layer_decision(layer, name, xin, lstate, Lf, jb, ones)
                mask, kj = None, ones * layer.width
                if layer.cgate is not None:
                    mask, kj, cstate = self._dense_channel_gate(layer, name, xin, cstate, Lj, chf, channels, cprobs)
                y = layer(xin, mask)
                if Lj is not ones:  # Fig. 3: a skipped layer repeats the previous layer's features
                    y = torch.lerp(prev, y, Lj[:, None, None, None])
                feats.append(y)
                prev = y
                L_cols.append(Lj), p_cols.append(pj), k_cols.append(kj)
                if j in exit_at:
                    exit_logits.append(self.exits[exit_at[j]](torch.cat(feats, 1)))
                j += 1
            h = torch.cat(feats, 1)
            if b < len(self.transitions):
                h = self.transitions[b](h)
        return self._dense_output(self._head(h), exit_logits, L_cols, p_cols, k_cols, channels, cprobs)

    # ------------------------------------------------------------------ sparse (inference) path
    def _forward_sparse(self, x, force, run):
        n = x.shape[0]
        h = self.stem(x)
        lstate = None  # numpy [h | c] of the layer-gate LSTM, created at the first gate
        cstate = self.channel_rnn.init_state(n, x) if self.channel_rnn is not None else None
        Lf, chf = force.get("layer"), force.get("channel", {})
        Lf = Lf.numpy() > 0.5 if Lf is not None else None  # decisions are made in numpy
        gates = not self.fully_forced(force)  # every decision forced: no gate needs to run
        exit_at = {p: i for i, p in enumerate(self.exit_positions)}
        j = jb = 0
        for b, blk in enumerate(self.dense_blocks):
            c0, k = h.shape[1], blk[0].growth
            buf = h.new_empty(h.shape[0], c0 + len(blk) * k, h.shape[2], h.shape[3])
            buf[:, :c0] = h
            pooled = None  # running global average of the features, for the layer gates
            for layer in blk:
                ex, c_in = None, layer.c_in
                if layer.skippable:
                    d = logit = None
                    if layer.lgate is not None and gates:
                        pooled = buf[:, :c_in].mean((2, 3)) if pooled is None else \
                            torch.cat([pooled, buf[:, c_in - k:c_in].mean((2, 3))], 1)
                        logit, lstate = self.layer_gate.fused_step(pooled, layer.lgate, lstate)
                        d = logit > 0
                    if Lf is not None:
                        d = Lf[:, jb] if run.active is None else Lf[run.active.numpy(), jb]
                    jb += 1
                    if d is not None:
                        run.layer(j, d, logit)
                        if not d.all():
                            ex = torch.from_numpy(np.flatnonzero(d))
                            sk = torch.from_numpy(np.flatnonzero(~d))
                            buf[sk, c_in:c_in + k] = buf[sk, c_in - k:c_in]
                if ex is None or len(ex):  # under a budget a sample may stop here, before its gates' work
                    keep, ex, _ = run.admit(j, ex)
                    buf, pooled, lstate, cstate = keep_rows(keep, buf, pooled, lstate, cstate)
                    if not len(buf):
                        return
                if ex is None or len(ex):
                    xin = buf[:, :c_in]
                    xe = xin if ex is None else xin.index_select(0, ex)
                    idx = run.sub(ex)
                    mask = None
                    if layer.cgate is not None:
                        mask, cstate = self._sparse_channel_mask(layer.cgate, f"{self._names[j]}.cgate", j, xe, ex,
                                                                 idx, cstate, chf, gates, run)
                        keep, ex, go = run.admit(j, ex, mask)
                        if keep is not None:
                            buf, pooled, lstate, cstate = keep_rows(keep, buf, pooled, lstate, cstate)
                            if not len(buf):
                                return
                            xe, mask = xe[go], mask[go]
                    if ex is None or len(ex):
                        y = layer.sparse(xe, mask, self.max_channel_groups)
                        if ex is None:
                            buf[:, c_in:c_in + k] = y
                        else:
                            buf[ex, c_in:c_in + k] = y
                if j in exit_at:
                    buf, pooled, lstate, cstate = keep_rows(run.at_exit(exit_at[j], buf[:, : c_in + k],
                                                                        self.exits[exit_at[j]]),
                                                            buf, pooled, lstate, cstate)
                    if not len(buf):
                        return
                j += 1
            h = buf
            if b < len(self.transitions):
                h = self.transitions[b](h)
        run.at_end(self._head(h))


def densenet201_exit_positions(block_sizes) -> list[int]:
    """Paper Sec. IV-A: one exit at 1/2 of the first dense block, then at 1/4 of the third and
    3/4 of the fourth (our reading of "1/4 and 3/4 depth of the remaining two dense blocks")."""
    starts = [sum(block_sizes[:i]) for i in range(len(block_sizes))]
    return [starts[0] + round(block_sizes[0] / 2) - 1, starts[2] + round(block_sizes[2] / 4) - 1,
            starts[3] + round(3 * block_sizes[3] / 4) - 1]


def _cifar_densenet(depth: int):
    def build(**kw):
        if (depth - 4) % 6:
            raise UserError(f"DenseNet-BC depth must be 6n+4, not {depth}")
        n = (depth - 4) // 6
        return DenseNet((n, n, n), growth=12, **kw)
    build.__name__ = f"densenet{depth}"
    build.__doc__ = f"CIFAR DenseNet-BC-{depth}, growth 12 ({(depth - 4) // 6} layers per block)."
    return register_model(build)


for _d in (40, 76, 82, 88, 100):
    _cifar_densenet(_d)


@register_model(num_classes=1000, input_size=224)
def densenet201(**kw):
    """ImageNet DenseNet-201 (growth 32, blocks 6/12/48/32, 224x224)."""
    return DenseNet((6, 12, 48, 32), growth=32, imagenet=True, **kw)


@register_model(input_size=16)
def densenet_tiny(**kw):
    """Test-sized DenseNet-BC (growth 4, 3 blocks of 3 layers, 16x16 input)."""
    return DenseNet((3, 3, 3), growth=4, **kw)
