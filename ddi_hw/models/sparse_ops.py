"""Helpers of the sparse (inference) path: BN folding with a cache, channel-mask grouping, the
batch-1 direct 3x3 convolution (`_gatekernels.conv3x3`) and its packed weights."""
from __future__ import annotations

import operator
from typing import Callable

import torch

try:
    from ddi_hw.models import _gatekernels
except ImportError:  # installed without a C compiler (the extension is optional): torch ops instead
    _gatekernels = None
FUSED = _gatekernels is not None  # the C kernels of the sparse path are installed


def fold_bn(weight: torch.Tensor, bn, bias: torch.Tensor | None = None):
    """conv followed by eval-mode BN == one conv with these weight and bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = bn.bias - bn.running_mean * scale
    if bias is not None:
        b = b + bias * scale
    return (weight * scale.view(-1, *([1] * (weight.dim() - 1)))).detach(), b.detach()


def pixel_layout(x: torch.Tensor):
    """(tensor, (data pointer, N, C, pixels, sample / channel / pixel stride)) of a float32
    (N, C, H, W) or (N, C) tensor for the C gate kernels (NCHW, channels-last or a channel slice of
    either; anything else is copied to a contiguous float32 tensor first). Keep the returned
    tensor alive while the pointer is used."""
    if x.dtype != torch.float32:
        x = x.float()
    st = x.stride()
    if x.dim() == 2:
        return x, (x.data_ptr(), x.shape[0], x.shape[1], 1, st[0], st[1], 1)
    n, c, h, w = x.shape
    if st[2] != st[3] * w and h > 1:  # pixels not on one stride
        x = x.contiguous()
        st = x.stride()
    return x, (x.data_ptr(), n, c, h * w, st[0], st[1], st[3])


def take_samples(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] along the batch, in x's memory format. Why not x.index_select(0, idx): on a
    channels-last map it returns NCHW, and converting back cost 5-9x the gather itself
    (0.54 vs 0.08 ms for 32 of 64 samples at 32x16x16); the NHWC view gathers in place."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(0, idx)


def _same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both float32, dense, with the same per-sample layout (NCHW or channels-last)."""
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.shape[1:] != b.shape[1:]:
        return False
    return any(a.is_contiguous(memory_format=f) and b.is_contiguous(memory_format=f)
               for f in (torch.contiguous_format, torch.channels_last))


def add_relu_(out: torch.Tensor, res: torch.Tensor, into: tuple | None = None,
              pool: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU(out + res) in place on out; or, with into = (map, rows) where res == map[rows], written
    straight into those rows of map (returned). pool ((N, C) float32, optional): the written rows'
    spatial means go into the same rows of it, for the next layer gate. One pass
    (`_gatekernels.add_relu`) instead of add_, relu_, index_copy_ and the gate's pooling: the copy
    back into the map and the pooling were layer skipping's batch-64 overhead. Falls back to torch
    ops for layouts the kernel does not take."""
    m, rows = into if into is not None else (out, None)
    if FUSED and _same_dense_layout(out, m) and (rows is None and _same_dense_layout(out, res)
                                                 or rows is not None and rows.dtype == torch.int64):
        rows = None if rows is None else rows.contiguous()
        usable = pool is not None and pool.dtype == torch.float32 and pool.is_contiguous()
        cl = not out.is_contiguous()  # dense but not NCHW: channels-last
        _gatekernels.add_relu(out.data_ptr(), (m if rows is not None else res).data_ptr(),
                              None if rows is None else rows.data_ptr(), out.shape[0], out[0].numel(),
                              pool.data_ptr() if usable else None, out.shape[1], cl)
        if pool is not None and not usable:
            _pool_rows(pool, m, rows)
        return m
    y = torch.relu_(out.add_(res))
    y = y if rows is None else m.index_copy_(0, rows, y)
    if pool is not None:
        _pool_rows(pool, m, rows)
    return y


def _pool_rows(pool: torch.Tensor, m: torch.Tensor, rows: torch.Tensor | None) -> None:
    """pool[rows] = spatial means of m[rows] (all rows when None)."""
    if rows is None:
        pool.copy_(m.mean((2, 3)))
    else:
        pool.index_copy_(0, rows, m.index_select(0, rows).mean((2, 3)))


def pack3x3(weight: torch.Tensor, bias: torch.Tensor):
    """(9, C_in, Cp) weights and Cp bias of a 3x3 conv for `conv3x3`: tap-major, output channels
    innermost, zero-padded to Cp = C_out rounded up to 8 (the kernel's vector width)."""
    co, ci = weight.shape[:2]
    cp = -(-co // 8) * 8
    wp = weight.new_zeros(9, ci, cp)
    wp[:, :, :co] = weight.detach().permute(2, 3, 1, 0).reshape(9, ci, co)
    bp = weight.new_zeros(cp)
    bp[:co] = bias.detach()
    return wp, bp


def conv3x3(x: torch.Tensor, wp: torch.Tensor, bp: torch.Tensor, c_out: int, stride: int = 1,
            residual: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
    """relu?(conv3x3(x, pad 1) + bias [+ residual]) of ONE sample, channels-last in and out, as one
    C call (`_gatekernels.conv3x3`). Why not F.conv2d: at batch 1 on these small maps oneDNN and
    im2col + GEMM do not shrink with the active channels and run odd channel counts slowly; this
    kernel reads and computes exactly the packed channels (benchmarks/skip_speed.py)."""
    x = x.contiguous(memory_format=torch.channels_last)  # float32: the sparse path's dtype
    _, ci, h, w = x.shape
    out = torch.empty(1, c_out, (h - 1) // stride + 1, (w - 1) // stride + 1, memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    _gatekernels.conv3x3(x.data_ptr(), h, w, ci, stride, wp.data_ptr(), bp.data_ptr(), c_out, out.data_ptr(),
                         None if residual is None else residual.data_ptr(), relu)
    return out


_VERSION = operator.attrgetter("_version")
_PTR = torch.Tensor.data_ptr


def module_tensors(*modules) -> list[torch.Tensor]:
    """Own parameters and buffers of `modules` (not submodules; BN's batch counter left out):
    what a folded weight is computed from."""
    return [t for m in modules if m is not None
            for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))
            if n != "num_batches_tracked"]


class FoldCache:
    """Folded / fused inference weights of one module, computed on first use and recomputed when
    any tensor they were computed from changed (in-place update: `_version`; `.data = ...`:
    `data_ptr`). Checked at each use, so a skipped block or an unused gate costs nothing (a
    check of every model tensor once per forward cost ~0.3 ms at batch 1, ~5% of ResNet-74).
    `DynamicNet` clears every cache when tensors may have been replaced (load_state_dict, .to())."""

    def __init__(self):
        self.value = None
        self._src: list[torch.Tensor] | None = None
        self._key = None

    def get(self, compute: Callable, sources: Callable[[], list]):
        src = self._src
        if src is None:
            src = self._src = list(sources())
        key = (list(map(_VERSION, src)), list(map(_PTR, src)))
        if self.value is None or key != self._key:
            with torch.no_grad():
                self.value = compute()
            self._key = key
        return self.value

    def clear(self) -> None:
        self.value = self._src = self._key = None


def run_channel_groups(x: torch.Tensor, mask: torch.Tensor, fn: Callable, max_groups: int = 8):
    """Run `fn(x_sub, active_channel_index, sub_mask_or_None)` per group of identical masks.

    Samples sharing a mask run as one batch over exactly their active channels. With more than
    `max_groups` distinct masks, one run over the union of active channels with the masks applied
    (`fn` then gets the mask restricted to those channels) -- still exact, no per-sample loop.
    """
    n = x.shape[0]
    if n == 1:
        return fn(x, mask[0].nonzero().squeeze(1), None)
    uniq, inv = torch.unique(mask, dim=0, return_inverse=True)
    if len(uniq) == 1:
        return fn(x, uniq[0].nonzero().squeeze(1), None)
    if len(uniq) <= max_groups:
        out = None
        for g in range(len(uniq)):
            idx = (inv == g).nonzero().squeeze(1)
            y = fn(x[idx], uniq[g].nonzero().squeeze(1), None)
            if out is None:
                out = y.new_empty(n, *y.shape[1:])
            out[idx] = y
        return out
    ch = mask.any(0).nonzero().squeeze(1)
    return fn(x, ch, mask[:, ch])
