"""CIFAR ResNets (He et al. 2016, Sec. 4.2) with MGL2S gates and early exits.

Backbone: 3x3 conv (16) + BN + ReLU, three stages of n basic blocks (16/32/64 channels, stride 2
at the start of stages 2 and 3), global average pool, linear; depth = 6n + 2. The stage-transition
shortcut is a 1x1 conv + BN projection (option B), so the static ResNet-110 has ~1.73 M params.

Skipping semantics (what a decision means, exactly):
- Layer gate (Eq. 1): a skippable block that runs outputs relu(x + bn2(conv2(h))); a skipped block
  outputs x. Blocks whose input and output shapes differ -- the first block of stages 2 and 3
  (stride 2, channel change) -- cannot be replaced by the identity, so they have no layer gate and
  always run (they can still be channel-gated); the stem and the classifier always run too.
- Channel gate (Eq. 2, per block, on conv1): channel c of conv1 off means conv1 does not compute
  it and h_c = 0 after BN1 + ReLU, so conv2 reads only the active channels; the block output is
  still relu(x + bn2(conv2(h))). (Eq. 2's per-channel pass-through of the input does not apply:
  conv1's output channels are internal to the block, not the block's output.) All channels off
  leaves relu(x + bn2's shift).
- MGL2S (Eq. 3): G^L first; if it skips, G^C is not evaluated (not run in the sparse path, not
  costed in either path).

The sparse path folds BN into the convs (eval mode), runs the layer gates on every sample still
running, then only the samples whose block runs (gather / compute / scatter), and slices conv1's
output and conv2's input channels; samples with identical channel masks run as one group (when
the batch has more than `max_channel_groups` distinct masks, one run over the union of their
active channels with the mask applied). Batch 1 without a budget runs the whole network as one C
call (`CifarResNet._program`, `_gatekernels.resnet`: gates, direct 3x3 convs over exactly the active
channels, channels-last, weights gathered per call); with a budget each block is one C call
(`_gatekernels.block`). Larger batches run PyTorch convs, channels-last (see `_conv_format`). When `force`
fixes every decision, no gate runs (`DynamicNet.fully_forced`). Gates run as fused C kernels on
cached folded weights (`gates.SharedLSTMGate.fused_step`, `gates.ChannelGateCNN.sparse`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddi_hw.errors import UserError
from ddi_hw.models.base import DynamicNet, keep_rows
from ddi_hw.models.exits import ExitBranch, default_exit_positions
from ddi_hw.models.gates import LAYER_GATE, ChannelGateCNN, GateKind
from ddi_hw.models.output import SliceViews
from ddi_hw.models.registry import register_model
from ddi_hw.models.sparse_ops import (
    FUSED,
    FoldCache,
    _gatekernels,
    _pool_rows,
    add_relu_,
    conv3x3,
    fold_bn,
    module_tensors,
    pack3x3,
    run_channel_groups,
    take_samples,
)

RESNET_FIELDS = 23  # columns of a block row of the C runner's program (_gatekernels.c, enum F_*)
CHANNELS_LAST_MIN = 16  # blocks this wide run channels-last (oneDNN direct conv)


def _conv_format(width: int):
    """Memory format of a block's sparse convs at batch > 1 (batch 1 runs the C kernels). Measured
    here (one thread, 16 channels at 32x32, min / median of 15): channels-last (oneDNN direct conv)
    2.0-2.2 / 2.0-2.4 ms at batch 64 and 1.7-2.0 / 1.8-2.7 ms at 48, against NCHW (im2col + GEMM, a
    ~37 MB column buffer per call at batch 64) 3.1-3.2 / 4.9-6.9 and 5.0-5.3 / 5.3-7.6 ms: NCHW was
    slower and so erratic that layer skipping's batch-64 ratio swung by 0.4 between runs. Odd
    channel counts (channel groups): 16 -> 9 1.09 vs 1.60 ms, 9 -> 16 1.09 vs 0.87-1.47 ms. So every
    ResNet width runs channels-last; the threshold stays for narrower custom widths."""
    return torch.channels_last if width >= CHANNELS_LAST_MIN else torch.contiguous_format


class Stem(nn.Module):
    def __init__(self, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(3, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self._fold = FoldCache()

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

    def folded(self):
        """(folded weight, bias, packed weight and bias for conv3x3), cached."""
        def compute():
            w, b = fold_bn(self.conv.weight, self.bn)
            return w, b, pack3x3(w, b)
        return self._fold.get(compute, lambda: module_tensors(self.conv, self.bn))

    def sparse(self, x):
        w, b, packed = self.folded()
        if x.shape[0] == 1 and FUSED:
            return conv3x3(x, *packed, w.shape[0])
        # channels-last out, as every block runs (`_conv_format`): no conversion of the map per block
        return F.relu_(F.conv2d(x.contiguous(memory_format=torch.channels_last), w, b, 1, 1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, layer_gate: bool, channel_gate: GateKind | None):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skippable = stride == 1 and c_in == c_out
        if not self.skippable:  # option B projection shortcut
            self.sc_conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            self.sc_bn = nn.BatchNorm2d(c_out)
        self.lgate = LAYER_GATE.build(c_in, c_out) if layer_gate and self.skippable else None
        self.cgate = channel_gate.build(c_in, c_out) if channel_gate else None
        self._fold = FoldCache()

    def forward(self, x, mask=None):
        """Masked dense block (training path)."""
        h = F.relu(self.bn1(self.conv1(x)))
        if mask is not None:
            h = h * mask[:, :, None, None].to(h.dtype)
        sc = x if self.skippable else self.sc_bn(self.sc_conv(x))
        return F.relu(self.bn2(self.conv2(h)) + sc)

    def _folded(self):
        def compute():
            fmt = _conv_format(self.conv1.out_channels)
            out = [*fold_bn(self.conv1.weight, self.bn1), *fold_bn(self.conv2.weight, self.bn2)]
            if not self.skippable:
                out += fold_bn(self.sc_conv.weight, self.sc_bn)
            src = (out[0].contiguous(), out[2].transpose(0, 1).contiguous())  # row gathers
            w1t = out[0].permute(0, 2, 3, 1).reshape(out[0].shape[0], -1).contiguous()  # (K, 9 C_in) rows
            packed = [*pack3x3(out[0], out[1]), *pack3x3(out[2], out[3]), w1t]  # batch 1: block
            packed = (packed, *[t.data_ptr() for t in packed], out[0].shape[0])
            out = [t.contiguous(memory_format=fmt) if t.dim() == 4 else t for t in out]
            return out + [src, packed, fmt]  # slice sources, packed (tensors, pointers, width), format
        return self._fold.get(compute, lambda: module_tensors(
            self.conv1, self.bn1, self.conv2, self.bn2, getattr(self, "sc_conv", None),
            getattr(self, "sc_bn", None)))

    def sparse(self, x, mask=None, max_groups: int = 8, into: tuple | None = None, pool=None):
        """Only active channels computed: conv1 output and conv2 input sliced, BN folded.
        into = (map, rows) with x == map[rows] (a skippable block run by some of the samples):
        the result is written into those rows of map, which is returned (batch > 1).
        pool: an (N, C) tensor whose rows of the written samples get their spatial means."""
        w1, b1, w2, b2, *rest = self._folded()
        src, packed, fmt = rest[-3:]
        if x.shape[0] == 1 and FUSED:
            y = self._sparse_one(x, mask, rest[:2], packed)
            y = y if into is None else into[0].index_copy_(0, into[1], y)
            if pool is not None:
                _pool_rows(pool, y, None if into is None else into[1])
            return y
        x = x.contiguous(memory_format=fmt)  # no-op when the previous block used the same format
        sc = x if self.skippable else F.conv2d(x, rest[0], rest[1], self.stride)
        if mask is None:
            out = F.conv2d(F.relu_(F.conv2d(x, w1, b1, self.stride, 1)), w2, b2, 1, 1)
        else:
            out = run_channel_groups(x, mask, lambda xs, ch, m: self._sliced(xs, ch, m, w1, b1, w2, b2, src, fmt),
                                     max_groups)
        if into is not None and not self.skippable:  # the residual is not the map's rows
            y = into[0].index_copy_(0, into[1], add_relu_(out, sc))
            if pool is not None:
                _pool_rows(pool, y, into[1])
            return y
        return add_relu_(out, sc, into, pool)

    def _sparse_one(self, x, mask, sc_fold, packed):
        """Batch 1: one C call (`_gatekernels.block`): conv1 on its active output channels, conv2 on
        those input channels, residual add and ReLU fused, channels-last; the active weights are
        gathered inside the call, so a new mask costs the same as a repeated one."""
        _, w1, b1, w2, b2, w1t, k = packed
        x = x.contiguous(memory_format=torch.channels_last)
        sc = x if self.skippable else F.conv2d(x, *sc_fold, self.stride).contiguous(memory_format=torch.channels_last)
        _, c, h, w = x.shape
        out = torch.empty(sc.shape, memory_format=torch.channels_last)
        _gatekernels.block(x.data_ptr(), h, w, c, self.stride, w1, w1t, b1, k, w2, b2, out.shape[1],
                           None if mask is None else mask.numpy(), sc.data_ptr(), out.data_ptr())
        return out

    def _slice(self, ch, src, b1, fmt):
        """conv1 rows and conv2 input columns of the active channels, contiguous in `fmt`:
        row gathers from NCHW conv1 and transposed conv2 copies (gathering from channels-last
        weights directly is 2x slower), then one conversion each."""
        w1n, w2t = src
        return (w1n.index_select(0, ch).contiguous(memory_format=fmt), b1.index_select(0, ch),
                w2t.index_select(0, ch).transpose(0, 1).contiguous(memory_format=fmt))

    def _run_sliced(self, x, w1, b1, w2, b2, m=None):
        if b1.shape[0] == 0:  # every channel off: conv2 sees zeros, leaves its folded BN shift
            ho = (x.shape[2] - 1) // self.stride + 1
            return b2.view(1, -1, 1, 1).expand(x.shape[0], -1, ho, ho).clone()
        h = F.relu_(F.conv2d(x, w1, b1, self.stride, 1))
        if m is not None:
            h = h * m[:, :, None, None]
        return F.conv2d(h, w2, b2, 1, 1)

    def _sliced(self, x, ch, m, w1, b1, w2, b2, src, fmt):
        ws = (w1, b1, w2) if len(ch) == b1.shape[0] else self._slice(ch, src, b1, fmt)
        return self._run_sliced(x, *ws, b2, m)


class CifarResNet(DynamicNet):
    """Gated CIFAR ResNet; see the module docstring for the exact skipping semantics."""

    family = "resnet"

    def __init__(self, depth: int, num_classes: int = 10, layer_gates: bool = False,
                 channel_gates: bool = False, channel_gate_kind: str = "cnn", exits: bool = False,
                 exit_positions: list[int] | None = None, widths=(16, 32, 64), max_channel_groups: int = 8,
                 input_size: int = 32):
        super().__init__()
        if (depth - 2) % 6:
            raise UserError(f"CIFAR ResNet depth must be 6n+2 (14, 20, 26, 38, 74, 110), not {depth}")
        n = (depth - 2) // 6
        self.depth, self.max_channel_groups, self.input_size = depth, max_channel_groups, input_size
        self._fold = FoldCache()  # the batch-1 C runner's program (`_program`)
        self._choose_channel_gate(channel_gates, channel_gate_kind)
        self.stem = Stem(widths[0])
        blocks, sizes, chans, c_in, size = [], [], [], widths[0], self.input_size
        for s, w in enumerate(widths):
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                size //= stride
                blocks.append(BasicBlock(c_in, w, stride, layer_gates, self.channel_gate))
                sizes.append(size)
                chans.append(w)
                c_in = w
        self.blocks = nn.ModuleList(blocks)
        self._build_shared_gates(layer_gates)
        self.fc = nn.Linear(widths[-1], num_classes)
        stage_sizes = [n] * len(widths)
        if exits:
            pos = sorted(exit_positions if exit_positions is not None else default_exit_positions(stage_sizes))
            self._check_exit_positions(pos, len(blocks), "block")
        else:
            pos = []
        self.exit_positions = pos
        self.exits = nn.ModuleList(ExitBranch(chans[p], sizes[p], num_classes) for p in pos)
        self._describe()
        self._build_default_table()

    # ------------------------------------------------------------------ structure
    def _describe(self) -> None:
        """Events for cost accounting and `ddi_*` annotations for spec extraction: every compute
        layer, pool and add is attributed to a block ("stem", "blocks.j", "exits.i", "head")."""
        self.block_skippable = [b.skippable for b in self.blocks]
        self.skippable_idx = [j for j, b in enumerate(self.blocks) if b.skippable]
        self.num_skippable = len(self.skippable_idx)
        self.gate_widths = {f"blocks.{j}.cgate": b.conv1.out_channels
                            for j, b in enumerate(self.blocks) if b.cgate is not None}
        self.events = [("fixed", "stem")]
        exit_at = {p: i for i, p in enumerate(self.exit_positions)}
        for j in range(len(self.blocks)):
            self.events.append(("block", f"blocks.{j}"))
            if j in exit_at:
                self.events.append(("exit", f"exits.{exit_at[j]}"))
        self.events.append(("fixed", "head"))
        ann = self._annotate
        ann(self, "head", "backbone")
        ann(self.fc, "head", "backbone")
        for m in self.stem.modules():
            ann(m, "stem", "backbone")
        for j, b in enumerate(self.blocks):
            self._annotate_gated_block(f"blocks.{j}", b)
        self._annotate_shared_gates_and_exits()

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
        jb = 0
        for j, b in enumerate(self.blocks):
            Lj, pj, lstate, jb = self._dense_layer_decision(b, f"blocks.{j}", h, lstate, Lf, jb, ones)
            mask, kj = None, ones * b.conv1.out_channels
            if b.cgate is not None:
                mask, kj, cstate = self._dense_channel_gate(b, f"blocks.{j}", h, cstate, Lj, chf, channels, cprobs)
            y = b(h, mask)
            h = y if Lj is ones else torch.lerp(h, y, Lj[:, None, None, None])  # L*y + (1-L)*h
            L_cols.append(Lj), p_cols.append(pj), k_cols.append(kj)
            if j in exit_at:
                exit_logits.append(self.exits[exit_at[j]](h))
        return self._dense_output(self.fc(h.mean((2, 3))), exit_logits, L_cols, p_cols, k_cols, channels, cprobs)

    # ------------------------------------------------------------------ sparse (inference) path
    def _sparse_blocks(self):
        """(j, block, skippable, layer-gate embed, channel gate, gate name) per block, built once:
        module attribute look-ups cost ~1 us each, noticeable per block at batch 1."""
        if getattr(self, "_sparse_blocks_list", None) is None:
            self._sparse_blocks_list = [(j, b, b.skippable, b.lgate, b.cgate, f"blocks.{j}.cgate")
                                        for j, b in enumerate(self.blocks)]
        return self._sparse_blocks_list

    def _program(self):
        """The batch-1 network as the C runner's program (`_gatekernels.resnet`): a header and one
        row per block of sizes and pointers into the folded weights, plus those tensors (kept
        alive) and each channel gate's slice of the concatenated masks. Cached until any model
        tensor changes (a version / pointer check of every tensor, ~0.15 ms per forward for the
        ~600 tensors of a gated ResNet-74: the largest Python cost left at batch 1). None when a
        part of this model has no C form (an RNN channel gate)."""
        def compute():
            if any(b.cgate is not None and not isinstance(b.cgate, ChannelGateCNN) for b in self.blocks):
                return None
            keep, rows, offsets, moff, jskip, size = [], [], {}, 0, 0, self.input_size
            ptr = lambda t: (keep.append(t), t.data_ptr())[1]  # noqa: E731
            for j, b, skippable, lgate, cgate, name in self._sparse_blocks():
                folded = b._folded()
                tensors, w1, b1, w2, b2, w1t, _ = folded[-2]  # packed for the batch-1 kernels
                keep.append(tensors)
                r = [0] * RESNET_FIELDS
                r[:6] = [b.conv1.in_channels, b.conv1.out_channels, size, size, b.stride, int(skippable)]
                r[6:10] = [w1, b1, w2, b2]
                if not skippable:  # the 1x1 projection as (C_in, C_out rounded up to 8)
                    w, bias = folded[4:6]
                    co, ci = w.shape[:2]
                    wt = w.new_zeros(ci, -(-co // 8) * 8)
                    wt[:, :co] = w.reshape(co, ci).t()
                    r[10:12] = [ptr(wt.contiguous()), ptr(bias.contiguous())]
                if lgate is not None:
                    f = self.layer_gate.folded(lgate)
                    keep.append(f[4])
                    r[12:16] = [f[0], f[1], f[2], ptr(torch.tensor([f[3]], dtype=torch.float32))]
                if cgate is not None:
                    _, _, fw, fb, fkeep, (wp, bp), k = cgate._folded()
                    keep.append(fkeep)
                    r[16:21] = [wp, bp, fw, fb, moff]
                    offsets[name] = (j, moff, k)
                    moff += k
                r[21:23] = [jskip, w1t]
                jskip += int(skippable)
                rows.append(r)
                size = (size - 1) // b.stride + 1
            sw, sb, (swp, sbp) = self.stem.folded()
            fcw = self.fc.weight.detach().t().contiguous()
            head = [ptr(swp), ptr(sbp), sw.shape[0], self.input_size, self.input_size, ptr(fcw),
                    ptr(self.fc.bias.detach().contiguous()), self.fc.out_features, len(rows), self.layer_gate.hidden
                    if self.layer_gate is not None else 0]
            spans = {g: (off, k) for g, (_, off, k) in offsets.items()}
            return (np.array(head, dtype=np.int64), np.array(rows, dtype=np.int64), offsets, spans, moff, keep)
        return self._fold.get(compute, lambda: [t for n, t in (*self.named_parameters(), *self.named_buffers())
                                                if not n.endswith("num_batches_tracked")])

    def _forward_one(self, x, force, run) -> bool:
        """Batch 1 without a budget: the whole forward as one C call (`_program`). False when the
        model has no C form (the Python loop then runs)."""
        if x.shape[1:] != (3, self.input_size, self.input_size):  # the program's sizes are the model's
            return False
        prog = self._program()
        if prog is None:
            return False
        head, rows, offsets, spans, total, _ = prog
        Lf, chf = force.get("layer"), force.get("channel", {})
        fl = None if Lf is None else (Lf.numpy()[0] > 0.5).astype(np.float32)
        fm = None
        if len(chf) == len(offsets) and chf:  # every gate forced: one concatenation in program order
            fm = np.concatenate([chf[g].numpy()[0] for g in offsets])
        elif chf:
            fm = np.full(total, np.nan, dtype=np.float32)
            for g, m in chf.items():
                _, off, k = offsets[g]
                fm[off:off + k] = m.numpy()[0]
        masks, mlog = np.zeros(total, dtype=np.float32), np.empty(total, dtype=np.float32)
        logits = np.empty(self.fc.out_features, dtype=np.float32)
        x = x.float().contiguous(memory_format=torch.channels_last)
        _gatekernels.resnet(head, rows, x.data_ptr(), fl, fm, not self.fully_forced(force), run._L[0], run._gl[0],
                            masks, mlog, run._k[0], logits)
        if offsets:  # sliced per gate on access; skipped blocks' gates: mask 0, no logits (as in the loop)
            ran = run._L[0]
            run.channels = SliceViews(torch.from_numpy(masks)[None], spans)
            run.channel_logits = SliceViews(torch.from_numpy(mlog)[None],
                                            {g: s for g, s in spans.items() if ran[offsets[g][0]]})
        run._store(None, torch.from_numpy(logits)[None])
        return True

    def _forward_sparse(self, x, force, run):
        if x.shape[0] == 1 and run.budget is None and FUSED and self._forward_one(x, force, run):
            return
        h = self.stem.sparse(x)
        n = x.shape[0]
        lstate = None  # numpy [h | c] of the layer-gate LSTM, created at the first gate
        cstate = self.channel_rnn.init_state(n, x) if self.channel_rnn is not None else None
        Lf, chf = force.get("layer"), force.get("channel", {})
        Lf = Lf.numpy() > 0.5 if Lf is not None else None  # decisions are made in numpy
        gates = not self.fully_forced(force)  # every decision forced: no gate needs to run
        exit_at = {p: i for i, p in enumerate(self.exit_positions)}
        layer_gate = self.layer_gate
        bulk = Lf is not None and not gates and run.budget is None  # all layer decisions known now
        if bulk:
            run.forced_layers(force["layer"])
        jb = 0
        # the layer gates' input: spatial means of h, written by each block while it writes its rows
        # (no extra pass over the map); None until a block has run on every sample
        pooled = None
        keep_pool = layer_gate is not None and gates
        for j, b, skippable, lgate, cgate, name in self._sparse_blocks():
            ex, skip = None, False  # ex: local indices of the running samples that run the block
            if skippable:
                d = logit = None
                if lgate is not None and gates:
                    logit, lstate = layer_gate.fused_step(h if pooled is None else pooled, lgate, lstate)
                    d = logit > 0
                if Lf is not None:
                    d = Lf[:, jb] if run.active is None else Lf[run.active.numpy(), jb]
                jb += 1
                if d is not None:
                    if not bulk:
                        run.layer(j, d, logit)
                    if len(d) == 1:  # batch 1: no index tensors
                        skip = not d[0]
                    else:
                        on = np.flatnonzero(d)
                        skip = len(on) == 0
                        if 0 < len(on) < len(d):
                            ex = torch.from_numpy(on)
            if not skip:  # under a budget a sample may stop here, before its channel gate or its convs
                keep, ex, _ = run.admit(j, ex)
                h, pooled, lstate, cstate = keep_rows(keep, h, pooled, lstate, cstate)
                if not len(h):
                    return
                skip = ex is not None and not len(ex)
            if not skip:
                hx = h if ex is None else take_samples(h, ex)
                idx = run.sub(ex)
                mask = None
                if cgate is not None:
                    mask, cstate = self._sparse_channel_mask(cgate, name, j, hx, ex, idx, cstate, chf, gates, run)
                    keep, ex, go = run.admit(j, ex, mask)
                    if keep is not None:
                        h, pooled, lstate, cstate = keep_rows(keep, h, pooled, lstate, cstate)
                        if not len(h):
                            return
                        hx, mask = hx[go], mask[go]
                        skip = ex is not None and not len(ex)
                if keep_pool and ex is None:
                    pooled = torch.empty(h.shape[0], b.conv2.out_channels)
                if not skip:  # h is this forward's own map: the running samples' rows are updated in place
                    h = b.sparse(hx, mask, self.max_channel_groups, None if ex is None else (h, ex), pooled)
            if j in exit_at:
                h, pooled, lstate, cstate = keep_rows(run.at_exit(exit_at[j], h, self.exits[exit_at[j]]),
                                                      h, pooled, lstate, cstate)
                if not len(h):
                    return
        run.at_end(self.fc(h.mean((2, 3))))



def _resnet(depth):
    def build(**kw):
        return CifarResNet(depth, **kw)
    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} basic blocks per stage)."
    return register_model(build)


for _d in (14, 20, 26, 38, 74, 110):
    _resnet(_d)
