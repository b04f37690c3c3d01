"""Gating networks of MGL2S (paper Sec. III-A2, Figs. 2 and 4).

- Layer gate G^L: per skippable block an embedding (global average pool, 1x1 conv c -> 10), then
  ONE LSTM cell (hidden 10) shared by all blocks that carries its state from block to block, a
  linear layer to one logit and a sigmoid (SkipNet's recurrent gate). The state passes unchanged
  through blocks that have no layer gate.
- Channel gate G^C (CNN, one per gated conv): 3x3 conv stride 2 (c -> c), ReLU, global average
  pool, fully connected c -> k, sigmoid, one decision per output channel. Its cost is 1/8 of a
  basic block's two 3x3 convs (the paper's 12.5%).
- Channel gate, RNN variant (paper Figs. 9-10 "channel skipping with RNN gates"): per gate the same
  embedding as G^L, one LSTM cell shared by all channel gates, and a per-gate linear 10 -> k.
- DenseNet light gate (Fig. 4): 1x1 conv stride 2 to half the bottleneck width, ReLU, 3x3 conv to
  the growth rate, ReLU, global average pool, linear -> bottleneck width (~1/8 of a dense layer).

Sparse (inference) path: the LSTM layer gate and (at batch 1) the whole CNN channel gate run as
one C call each (`_gatekernels.c`, built at install) on weights folded once and cached (`FoldCache`: recomputed
when a source tensor changes, cleared on train()/eval(), load_state_dict and .to()); a torch op
costs 5-10 us at batch 1, which made the module form of a gate cost more than the work it saved.
Without the extension (`sparse_ops.FUSED` False: installed without a C compiler) the same math runs
as torch ops (slower at batch 1, same decisions: tests/test_gatekernels_fallback.py).

Decisions are hard 0/1 (logit > 0). In training the straight-through estimator keeps the hard
value in the forward pass and passes the sigmoid's gradient backwards.

`GATE_KINDS` (end of this file) is the one registry of gate kinds: every other module asks it which
module a kind builds, what a gate decides (its role in the cost accounting), which shared part
the exporter writes, and which numpy forward (`ddi_hw.deploy.processor.GATE_OPS`, torch-free) the
reference and the board run for it. A new gate kind is one class here plus one entry there.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddi_hw.errors import UserError
from ddi_hw.models.sparse_ops import FUSED, FoldCache, _gatekernels, module_tensors, pack3x3, pixel_layout

GATE_HIDDEN = 10
OPEN_BIAS = 2.0  # gates start open (sigmoid(2) = 0.88): training starts from zero skipping


def hard_decision(logit: torch.Tensor) -> torch.Tensor:
    """0/1 decision; straight-through (sigmoid gradient) when the logit needs a gradient."""
    hard = (logit > 0).to(logit.dtype)
    if logit.requires_grad:
        p = torch.sigmoid(logit)
        return hard + (p - p.detach())  # value is exactly `hard`
    return hard


def _ptrs(weight: torch.Tensor, bias: torch.Tensor):
    """float32 contiguous copies' data pointers (for the C kernels) and the copies (kept alive)."""
    w, b = weight.detach().float().contiguous(), bias.detach().float().contiguous()
    return w.data_ptr(), b.data_ptr(), (w, b)


class LayerGateEmbed(nn.Module):
    """Per-block part of G^L: global average pool, 1x1 conv c -> 10."""

    def __init__(self, c_in: int, hidden: int = GATE_HIDDEN):
        super().__init__()
        self.conv = nn.Conv2d(c_in, hidden, 1)
        self.fused = FoldCache()

    @classmethod
    def for_block(cls, c_in: int, width: int, growth: int | None = None) -> "LayerGateEmbed":
        return cls(c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.adaptive_avg_pool2d(x, 1)).flatten(1)


class SharedLSTMGate(nn.Module):
    """The recurrent part shared by all gates of one kind: LSTM cell (hidden 10)."""

    def __init__(self, hidden: int = GATE_HIDDEN, out: int | None = 1):
        super().__init__()
        self.hidden = hidden
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.proj = nn.Linear(hidden, out) if out else None  # layer gate: shared linear to 1 logit
        if self.proj is not None:
            nn.init.constant_(self.proj.bias, OPEN_BIAS)

    def at_block(self, block: str, layer_gate: str | None = None) -> None:
        """Attribute the next call to `block` (spec extraction lists one spec per call)."""
        for m in self.modules():
            m.ddi_block, m.ddi_layer_gate = block, layer_gate

    def init_state(self, n: int, ref: torch.Tensor):
        z = ref.new_zeros(n, self.hidden)
        return z, z

    def step(self, emb: torch.Tensor, state):
        return self.lstm(emb, state)

    def fused_step(self, x: torch.Tensor, embed: "LayerGateEmbed", state):
        """Inference form of embed -> LSTM cell -> linear for the sparse path: one C call
        (`_gatekernels.lstm_gate`: mean pool, the 1x1 embedding folded into the LSTM input
        weights, one product over [pooled, h], pointwise ops in place) on cached folded weights.
        Same math as `embed` + `step` + `logit` (tested against them). `x`: (N, C, H, W) features
        (pooled here) or (N, C) already pooled means. `state`: float32 numpy (N, 2H) = [h | c],
        updated in place, or None (zeros). Returns (logits as numpy (N,), state)."""
        n = x.shape[0]
        if state is None:
            state = np.zeros((n, 2 * self.hidden), dtype=np.float32)
        if not FUSED:
            return self._step_torch(x, embed, state), state
        f = self.folded(embed)
        out = np.empty(n, dtype=np.float32)
        x, layout = pixel_layout(x)
        _gatekernels.lstm_gate(*layout, f[0], f[1], f[2], f[3], self.hidden, state, out)
        return out, state

    def _step_torch(self, x: torch.Tensor, embed: "LayerGateEmbed", state: np.ndarray) -> np.ndarray:
        """`fused_step` without the C kernels: embed -> LSTM cell -> linear as torch ops, the
        numpy [h | c] state updated in place as the kernel does. Returns the logits (N,)."""
        pooled = x.float() if x.dim() == 2 else x.float().mean((2, 3))
        s, hid = torch.from_numpy(state), self.hidden
        with torch.no_grad():
            h, c = self.step(embed.conv(pooled[:, :, None, None]).flatten(1), (s[:, :hid], s[:, hid:]))
            s[:, :hid], s[:, hid:] = h, c
            return self.logit(h).numpy()

    def folded(self, embed: "LayerGateEmbed"):
        """`_fold(embed)`, cached on the embedding (recomputed when a source tensor changes)."""
        return embed.fused.get(lambda: self._fold(embed), lambda: module_tensors(embed.conv, self.lstm, self.proj))

    def _fold(self, embed: "LayerGateEmbed"):
        """(w ptr, b ptr, proj ptr, proj bias, tensors kept alive): w = [W_ih W_conv ; W_hh]^T."""
        lstm = self.lstm
        w_ih = lstm.weight_ih @ embed.conv.weight.flatten(1)
        b = (lstm.weight_ih @ embed.conv.bias + lstm.bias_ih + lstm.bias_hh).float().contiguous()
        w = torch.cat([w_ih, lstm.weight_hh], 1).t().float().contiguous()  # (C + H, 4H)
        pw = self.proj.weight.detach().flatten().float().contiguous()
        return w.data_ptr(), b.data_ptr(), pw.data_ptr(), float(self.proj.bias.detach()), (w, b, pw)

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).squeeze(1)


class ChannelGateCNN(nn.Module):
    """G^C for one conv: 3x3 conv stride 2 (c -> c), ReLU, global pool, linear c -> k."""

    def __init__(self, c_in: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1)
        self.fc = nn.Linear(c_in, k)
        nn.init.constant_(self.fc.bias, OPEN_BIAS)
        self.fused = FoldCache()

    @classmethod
    def for_block(cls, c_in: int, width: int, growth: int | None = None) -> "ChannelGateCNN":
        return cls(c_in, width)

    def forward(self, x: torch.Tensor, rnn=None, state=None):
        h = F.relu(self.conv(x))
        return self.fc(h.mean((2, 3))), state

    def sparse(self, x: torch.Tensor, rnn=None, state=None):
        """Same math -> (logits, state, hard mask). Batch 1: the whole gate is one C call
        (`_gatekernels.gate_conv`: direct stride-2 conv on packed weights, ReLU and global sum in
        registers -- the conv output is never stored -- then the FC and the 0/1 mask); at 2-4x its
        FLOP share, oneDNN's conv was most of a gate's time. Batch > 1: the stride-2 conv runs
        channels-last (oneDNN) and ReLU, pooling and the FC are one C call (`pool_fc`)."""
        w, b, fw, fb, keep, (wp, bp), k = self._folded()
        n = x.shape[0]
        logit, mask = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.float32)
        if n == 1 and FUSED:
            x = x.contiguous(memory_format=torch.channels_last)
            _, c, h, wd = x.shape
            _gatekernels.gate_conv(x.data_ptr(), h, wd, c, wp, bp, fw, fb, k, logit, mask)
            return torch.from_numpy(logit), state, torch.from_numpy(mask)
        y = F.conv2d(x.contiguous(memory_format=torch.channels_last), w, b, 2, 1)
        if not FUSED:  # no C kernels: the same head as torch ops
            with torch.no_grad():
                logit = self.fc(F.relu(y).mean((2, 3)))
            return logit, state, (logit > 0).float()
        y, layout = pixel_layout(y)
        _gatekernels.pool_fc(*layout, True, fw, fb, k, logit, mask)
        return torch.from_numpy(logit), state, torch.from_numpy(mask)

    def _folded(self):
        """Cached: conv weight channels-last and bias; FC pointers for `pool_fc` (weight
        transposed) and the tensors behind them; pointers of the conv packed for `gate_conv` (kept
        alive in the FC tuple); the number of outputs."""
        def compute():
            w = self.conv.weight.detach()
            fw, fb, keep = _ptrs(self.fc.weight.t(), self.fc.bias)
            packed = pack3x3(w.float(), self.conv.bias.float())
            return (w.contiguous(memory_format=torch.channels_last), self.conv.bias.detach(), fw, fb,
                    (*keep, *packed), (packed[0].data_ptr(), packed[1].data_ptr()), self.fc.out_features)
        return self.fused.get(compute, lambda: module_tensors(self.conv, self.fc))


class ChannelGateRNN(nn.Module):
    """G^C, recurrent variant: embedding (pool, 1x1 conv c -> 10), shared LSTM, linear 10 -> k."""

    def __init__(self, c_in: int, k: int, hidden: int = GATE_HIDDEN):
        super().__init__()
        self.conv = nn.Conv2d(c_in, hidden, 1)
        self.fc = nn.Linear(hidden, k)
        nn.init.constant_(self.fc.bias, OPEN_BIAS)

    @classmethod
    def for_block(cls, c_in: int, width: int, growth: int | None = None) -> "ChannelGateRNN":
        return cls(c_in, width)

    def forward(self, x: torch.Tensor, rnn: SharedLSTMGate, state):
        emb = self.conv(F.adaptive_avg_pool2d(x, 1)).flatten(1)
        h, c = rnn.step(emb, state)
        return self.fc(h), (h, c)

    def sparse(self, x: torch.Tensor, rnn: SharedLSTMGate, state):
        logit, state = self.forward(x, rnn, state)
        return logit, state, (logit > 0).float()


class DenseLightGate(nn.Module):
    """DenseNet light channel gate (Fig. 4): 1x1/2 conv to k_b/2, 3x3 conv to growth, pool, FC."""

    def __init__(self, c_in: int, bottleneck: int, growth: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, bottleneck // 2, 1, stride=2)
        self.conv2 = nn.Conv2d(bottleneck // 2, growth, 3, padding=1)
        self.fc = nn.Linear(growth, bottleneck)
        nn.init.constant_(self.fc.bias, OPEN_BIAS)

    @classmethod
    def for_block(cls, c_in: int, width: int, growth: int | None = None) -> "DenseLightGate":
        return cls(c_in, width, growth)

    def forward(self, x: torch.Tensor, rnn=None, state=None):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3))), state

    def sparse(self, x: torch.Tensor, rnn=None, state=None):
        logit, state = self.forward(x)
        return logit, state, (logit > 0).float()


def decision_biases(model: nn.Module) -> list[torch.Tensor]:
    """The bias of every gate's last layer (the shared layer-gate projection, each channel gate's FC).
    One offset added to all of them moves every 0/1 decision's threshold alike; as plain biases the
    exported model and the board run the shifted gates unchanged (`ddi_hw.train.trim_saving`)."""
    out = []
    for m in model.modules():
        if isinstance(m, SharedLSTMGate) and m.proj is not None:
            out.append(m.proj.bias)
        elif isinstance(m, (ChannelGateCNN, ChannelGateRNN, DenseLightGate)):
            out.append(m.fc.bias)
    return out


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class GateKind:
    """Everything the other modules need to know about one kind of gate."""
    name: str
    role: str  # "layer": may skip its block, runs whenever the block is reached; "channel": masks
    #            the block's channels, runs only when the block runs (MGL2S)
    cls: type  # the per-block module; `cls.for_block(c_in, width, growth)` builds it
    deploy: str  # key of ddi_hw.deploy.processor.GATE_OPS: the numpy forward the reference and board run
    shared: str | None = None  # model attribute of the recurrent part all gates of this kind step
    make_shared: Callable[[], nn.Module] | None = None  # builds that shared part

    def build(self, c_in: int, width: int, growth: int | None = None) -> nn.Module:
        return self.cls.for_block(c_in, width, growth)


LAYER_GATE = GateKind("lstm", "layer", LayerGateEmbed, "lstm", "layer_gate", SharedLSTMGate)
GATE_KINDS: dict[str, GateKind] = {k.name: k for k in (
    LAYER_GATE,
    GateKind("cnn", "channel", ChannelGateCNN, "cnn"),
    GateKind("dense_light", "channel", DenseLightGate, "dense_light"),
    GateKind("rnn", "channel", ChannelGateRNN, "rnn", "channel_rnn", partial(SharedLSTMGate, out=None)),
)}
# create_model(channel_gate_kind=...) -> gate kind per model family (DenseNets: the light gate of Fig. 4)
CHANNEL_GATE_OPTIONS: dict[str, dict[str, str]] = {
    "cnn": {"resnet": "cnn", "densenet": "dense_light"},
    "rnn": {"resnet": "rnn", "densenet": "rnn"},
}


def check_channel_gate_option(option: str) -> None:
    if option not in CHANNEL_GATE_OPTIONS:
        raise UserError(f"channel_gate_kind must be {' or '.join(map(repr, CHANNEL_GATE_OPTIONS))}, not {option!r}")


def channel_gate_kind(option: str | None, family: str) -> GateKind | None:
    """The channel-gate kind a `family` model builds for `channel_gate_kind=option` (None: no gates)."""
    if option is None:
        return None
    check_channel_gate_option(option)
    return GATE_KINDS[CHANNEL_GATE_OPTIONS[option][family]]


def kind_of(module: nn.Module) -> GateKind:
    """The registered kind of a per-block gate module."""
    for k in GATE_KINDS.values():
        if type(module) is k.cls:
            return k
    raise KeyError(f"{type(module).__name__} is not a registered gate kind")


def gate_module_classes() -> tuple[type, ...]:
    """Every module class that is part of a gating network (IADI step 1 trains only these)."""
    return tuple(dict.fromkeys([k.cls for k in GATE_KINDS.values()] + [SharedLSTMGate]))
