"""What the processor (the board's ARM, or the host for the reference and C-sim) computes in float.

Torch-free and numpy-only, so it runs on the board: the gates' numpy forwards, keyed by gate kind,
and the small ops they and the exit branches use (`EXIT_ENGINE_CONVS`). `GATE_OPS` is the board half of the gate
registry; the torch half, `ddi_hw.models.gates.GATE_KINDS`, names one of these kinds for every
gate module (`GateKind.deploy`), and a test checks both halves compute the same decisions.

A gate's tensors are read from `processor.safetensors` under its prefix (e.g. `blocks.3.cgate`);
a recurrent gate also steps a shared LSTM stored once under `GateOp.shared` (`layer_gate`,
`channel_rnn`), whose (h, c) state the processor carries from gate to gate within one image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def conv2d_f(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int = 1, pad: int = 0) -> np.ndarray:
    """Float conv of one CHW image by im2col (processor side: gates and exit branches)."""
    c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    cols = np.empty((c, kh, kw, oh, ow), dtype=x.dtype)
    for ky in range(kh):
        for kx in range(kw):
            cols[:, ky, kx] = xp[:, ky:ky + stride * (oh - 1) + 1:stride, kx:kx + stride * (ow - 1) + 1:stride]
    y = w.reshape(o, -1) @ cols.reshape(-1, oh * ow)
    if b is not None:
        y += b[:, None]
    return y.reshape(o, oh, ow)


def maxpool_ceil(x: np.ndarray, k: int) -> np.ndarray:
    """k x k max pool, stride k, ceil mode (torch's `max_pool2d(x, k, ceil_mode=True)`): windows at
    multiples of k, clipped at the edge. For k = 2^n it equals n successive 2x2 ceil-mode pools, so an
    exit branch reads its map once. Exact on integer maps (the engine's int16 map, its own Q format)."""
    c, h, w = x.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    low = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf
    xp = np.full((c, hp, wp), low, dtype=x.dtype)
    xp[:, :h, :w] = x
    return xp.reshape(c, hp // k, k, wp // k, k).max(axis=(2, 4))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def lstm_cell(x, state, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.LSTMCell gate order (i, f, g, o)."""
    h, c = state
    z = w_ih @ x + b_ih + w_hh @ h + b_hh
    i, f, g, o = np.split(z, 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    return sigmoid(o) * np.tanh(c), c


# ----------------------------------------------------------------------------- gate kinds

LSTM_TENSORS = ("lstm.weight_ih", "lstm.weight_hh", "lstm.bias_ih", "lstm.bias_hh")


def _embed(p, pre: str, x: np.ndarray) -> np.ndarray:
    """Global average pool (x: a (C, H, W) map, or its (C,) pooled means), then the gate's 1x1 conv
    (c -> hidden) as a matrix product."""
    w = p[f"{pre}.conv.weight"]
    pooled = x if x.ndim == 1 else x.mean(axis=(1, 2))
    return w.reshape(w.shape[0], -1) @ pooled + p[f"{pre}.conv.bias"]


def _lstm_step(p, shared: str, emb: np.ndarray, state):
    if state is None:
        z = np.zeros(p[f"{shared}.lstm.weight_hh"].shape[1], np.float32)
        state = (z, z)
    return lstm_cell(emb, state, *(p[f"{shared}.{t}"] for t in LSTM_TENSORS))


def _layer_lstm(p, pre, shared, x, state):
    """G^L: embedding, shared LSTM cell, shared linear to one logit."""
    state = _lstm_step(p, shared, _embed(p, pre, x), state)
    return p[f"{shared}.proj.weight"] @ state[0] + p[f"{shared}.proj.bias"], state


def _channel_cnn(p, pre, shared, x, state):
    """G^C: 3x3 stride-2 conv, ReLU, global pool, linear c -> k."""
    h = np.maximum(conv2d_f(x, p[f"{pre}.conv.weight"], p[f"{pre}.conv.bias"], 2, 1), 0)
    return p[f"{pre}.fc.weight"] @ h.mean(axis=(1, 2)) + p[f"{pre}.fc.bias"], state


def _channel_dense_light(p, pre, shared, x, state):
    """DenseNet light gate: 1x1 stride-2 conv, ReLU, 3x3 conv, ReLU, global pool, linear."""
    h = np.maximum(conv2d_f(x, p[f"{pre}.conv1.weight"], p[f"{pre}.conv1.bias"], 2, 0), 0)
    h = np.maximum(conv2d_f(h, p[f"{pre}.conv2.weight"], p[f"{pre}.conv2.bias"], 1, 1), 0)
    return p[f"{pre}.fc.weight"] @ h.mean(axis=(1, 2)) + p[f"{pre}.fc.bias"], state


def _channel_rnn(p, pre, shared, x, state):
    """G^C, recurrent: embedding, shared LSTM cell, per-gate linear 10 -> k."""
    state = _lstm_step(p, shared, _embed(p, pre, x), state)
    return p[f"{pre}.fc.weight"] @ state[0] + p[f"{pre}.fc.bias"], state


@dataclass(frozen=True)
class GateOp:
    """The processor's view of one gate kind. `forward(tensors, prefix, shared, x, state)` takes
    the gate's (C, H, W) float input and the shared recurrent state (None at the first gate) and
    returns (logits, new state); a decision is logit > 0."""
    forward: Callable
    tensors: tuple[str, ...]  # per gate, under its prefix
    shared: str | None = None  # prefix of the shared recurrent part it steps
    shared_tensors: tuple[str, ...] = ()
    pooled: bool = False  # reads only the input's global average pool (the engine writes it: FLAG_POOL)
    engine_convs: tuple[str, ...] = ()  # in a bundle: these convs (under the prefix) run on the engine
    #   in this order, the last one writing only its pooled sums; then `fc` here (`forward` is the
    #   same math in float: the reference the torch gate is tested against)

    def keys(self, prefix: str) -> list[str]:
        """processor.safetensors entries this gate reads in a bundle (its engine convs' weights are
        in engine.bin)."""
        own = [t for t in self.tensors if t.rsplit(".", 1)[0] not in self.engine_convs]
        return [f"{prefix}.{t}" for t in own] + [f"{self.shared}.{t}" for t in self.shared_tensors]


# An exit branch in a bundle (`ddi_hw.models.exits.ExitBranch`): its max pool (one pass) here on the int16 map,
# then these convs (+ BN folded + ReLU) on the engine, named `<prefix>.<conv>` like their cost-table
# rows, the last writing only its pooled sums (FLAG_POOL + FLAG_NO_STORE); then `fc` here on their means.
EXIT_ENGINE_CONVS = ("conv1", "conv2")
EXIT_TENSORS = ("fc.weight", "fc.bias")

GATE_OPS: dict[str, GateOp] = {
    "lstm": GateOp(_layer_lstm, ("conv.weight", "conv.bias"), "layer_gate",
                   LSTM_TENSORS + ("proj.weight", "proj.bias"), pooled=True),
    "cnn": GateOp(_channel_cnn, ("conv.weight", "conv.bias", "fc.weight", "fc.bias"), engine_convs=("conv",)),
    "dense_light": GateOp(_channel_dense_light, ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                                 "fc.weight", "fc.bias"), engine_convs=("conv1", "conv2")),
    "rnn": GateOp(_channel_rnn, ("conv.weight", "conv.bias", "fc.weight", "fc.bias"), "channel_rnn", LSTM_TENSORS,
                  pooled=True),
}
