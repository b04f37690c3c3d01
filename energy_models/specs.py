"""Layer specs: the compute layers of a real `nn.Module`, found by running it, not by a table.

A `LayerSpec` is everything later stages need to cost one layer: its shape and which gates
control its channels. Model builders annotate modules with plain attributes (all optional):

    module.ddi_block    = "stage1.block0"   # block the layer belongs to (default: parent module name)
    module.ddi_role     = "backbone"        # "backbone" | "gate" | "exit"
    module.ddi_out_gate = "stage1.block0.cgate"  # channel gate masking this layer's output channels
    module.ddi_in_gate  = "stage1.block0.cgate"  # channel gate masking this layer's input channels
    module.ddi_layer_gate = "stage1.block0.lgate"  # layer gate that can skip the whole block
    module.ddi_gate_kind = "cnn"        # role "gate": which kind of gate (the model's own registry)
    module.ddi_skip = "copy"            # when its block is skipped, this layer's output is a copy of
                                        # the previous layer's (DenseNet); default: nothing replaces it

so plain torchvision-style models work unannotated and gated models need no special tracing.

Annotations are read *when the module is called*, so a module shared by several blocks (e.g. one
LSTM cell called once per residual block) can have `ddi_block` set before each call; every call
becomes its own spec named `name#i` (i = call index) carrying the block of that call.

What is captured, and how:
- `nn.Conv2d`, `nn.Linear`: forward hooks on the real forward pass (input size from the tensor).
- `nn.LSTM` / `nn.LSTMCell`: listed as their matrix multiplies, two `linear` specs per call and
  layer (`<name>.ih`: input -> 4H, `<name>.hh`: hidden -> 4H; rows = time steps).
- pooling (`avg/max/adaptive` pools, module or functional, and spatial `mean`) and elementwise
  adds of two equal-shape tensors (residual adds): caught with a `TorchFunctionMode` during the
  same pass, named after the innermost module that ran them (`<module>.add`, `<module>.pool`).
  They are costed analytically later, not by SCALE-Sim.
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass

from energy_models.errors import UserError

KINDS = ("conv", "linear", "pool", "add")


@dataclass(frozen=True)
class LayerSpec:
    name: str  # qualified module name, unique in the model
    kind: str  # "conv" | "linear" | "pool" | "add"  (LSTMs are listed as two "linear" specs)
    in_ch: int
    out_ch: int
    in_h: int  # unpadded input height (rows of the matrix for linear, 1 for a plain vector)
    in_w: int
    out_h: int
    out_w: int
    kernel_h: int = 1
    kernel_w: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    block: str = ""
    role: str = "backbone"
    out_gate: str | None = None
    in_gate: str | None = None
    layer_gate: str | None = None
    gate_kind: str | None = None
    skip: str | None = None  # "copy": a skipped block's output is the previous layer's, copied

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the dense layer; pool: one add/compare per window element,
        add: one add per output element."""
        return self.macs_at(self.out_ch, self.in_ch)

    def macs_at(self, out_active: int, in_active: int) -> int:
        """MACs with only `out_active` output and `in_active` input channels computed."""
        pix = self.out_h * self.out_w
        if self.kind in ("conv", "linear"):
            return pix * out_active * (in_active // self.groups) * self.kernel_h * self.kernel_w
        if self.kind == "pool":
            return pix * out_active * self.kernel_h * self.kernel_w
        return pix * out_active

    def sim_input_hw(self) -> tuple[int, int]:
        """Input size to hand SCALE-Sim, which does not pad and rounds its output size up:
        the padded input cropped to the rows/cols the windows touch, so its output = ours."""
        return ((self.out_h - 1) * self.stride + self.kernel_h,
                (self.out_w - 1) * self.stride + self.kernel_w)

    def as_dict(self) -> dict:
        return asdict(self)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _annotations(module, name: str) -> dict:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return dict(
        block=str(getattr(module, "ddi_block", None) or parent),
        role=str(getattr(module, "ddi_role", None) or "backbone"),
        out_gate=getattr(module, "ddi_out_gate", None),
        in_gate=getattr(module, "ddi_in_gate", None),
        layer_gate=getattr(module, "ddi_layer_gate", None),
        gate_kind=getattr(module, "ddi_gate_kind", None),
        skip=getattr(module, "ddi_skip", None),
    )


def extract_specs(model, input_shape) -> list:
    """Run one real forward pass (eval mode, no grad) of `model` on zeros of `input_shape`
    and return the compute layers in execution order."""
    import torch
    from torch import nn
    from torch.overrides import TorchFunctionMode

    if len(input_shape) < 2 or any(int(d) <= 0 for d in input_shape):
        raise UserError(f"input shape {tuple(input_shape)} is invalid; give e.g. (1, 3, 32, 32)")
    names = {m: n for n, m in model.named_modules()}
    records: list[tuple[str, int, dict]] = []  # (base name, call index, spec fields)
    ncalls: dict[str, int] = {}

    def add(base: str, fields: dict, new_call: bool = True) -> None:
        if new_call:
            ncalls[base] = ncalls.get(base, 0) + 1
        records.append((base, ncalls[base] - 1, fields))

    stack: list = []  # modules currently executing (innermost last)
    opaque = (nn.Conv2d, nn.Linear, nn.LSTM, nn.LSTMCell, nn.modules.batchnorm._BatchNorm)

    def conv_hook(mod, inp, out):
        x = inp[0]
        kh, kw = _pair(mod.kernel_size)
        sh, sw = _pair(mod.stride)
        dh, dw = _pair(mod.dilation)
        if dh != 1 or dw != 1:
            raise UserError(f"layer {names[mod]}: dilated convolution is not supported by the "
                            "SCALE-Sim runner; use dilation=1")
        if isinstance(mod.padding, str):
            pad = max(0, ((out.shape[-2] - 1) * sh + kh - x.shape[-2]) // 2)
        else:
            pad = _pair(mod.padding)[0]
        add(names[mod], dict(
            kind="conv", in_ch=x.shape[1], out_ch=out.shape[1], in_h=x.shape[-2],
            in_w=x.shape[-1], out_h=out.shape[-2], out_w=out.shape[-1], kernel_h=kh, kernel_w=kw,
            stride=sh, padding=pad, groups=mod.groups, **_annotations(mod, names[mod])))

    def linear_hook(mod, inp, out):
        x = inp[0]
        rows = math.prod(x.shape[1:-1]) if x.dim() > 2 else 1
        add(names[mod], dict(
            kind="linear", in_ch=mod.in_features, out_ch=mod.out_features, in_h=rows, in_w=1,
            out_h=rows, out_w=1, **_annotations(mod, names[mod])))

    def lstm_hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, nn.LSTM):
            steps = x.shape[1 if mod.batch_first else 0] if x.dim() == 3 else x.shape[0]
            layers = mod.num_layers * (2 if mod.bidirectional else 1)
            in_sizes = [mod.input_size] + [mod.hidden_size * (2 if mod.bidirectional else 1)] * (
                mod.num_layers - 1)
        else:
            steps, layers, in_sizes = 1, 1, [mod.input_size]
        ann = _annotations(mod, names[mod])
        first = True
        for layer in range(layers):
            tag = f".l{layer}" if layers > 1 else ""
            isz = in_sizes[layer // (2 if getattr(mod, "bidirectional", False) else 1)]
            for part, fan_in in (("ih", isz), ("hh", mod.hidden_size)):
                add(names[mod], dict(
                    kind="linear", in_ch=fan_in, out_ch=4 * mod.hidden_size, in_h=steps, in_w=1,
                    out_h=steps, out_w=1, suffix=f"{tag}.{part}", **ann), new_call=first)
                first = False

    def pre(mod, inp):
        stack.append(mod)

    def post(mod, inp, out):
        if stack and stack[-1] is mod:
            stack.pop()

    class OpSpy(TorchFunctionMode):
        """Lists pools and residual adds run outside conv/linear/LSTM/BN modules."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if any(isinstance(m, opaque) for m in stack):
                return out
            try:
                _spy(func, args, kwargs, out)
            except Exception:  # never let bookkeeping break the model's own forward
                pass
            return out

    F = nn.functional
    pool_funcs = {F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                  torch.max_pool2d, F.max_pool2d_with_indices,
                  F.adaptive_max_pool2d_with_indices}
    add_funcs = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
                 torch.Tensor.__iadd__, torch.Tensor.__radd__, operator.add}
    mean_funcs = {torch.mean, torch.Tensor.mean}

    def _owner():
        mod = stack[-1] if stack else model
        return mod, names.get(mod, "") or "model"

    def _spy(func, args, kwargs, out):
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
            return
        mod, owner = _owner()
        ann = _annotations(mod, owner)
        ann["block"] = str(getattr(mod, "ddi_block", None) or owner)  # an op's block: its module
        if func in pool_funcs or (func in mean_funcs and args[0].dim() == 4 and out.dim() in (2, 4)
                                  and out.numel() == args[0].shape[0] * args[0].shape[1]):
            x = args[0]
            oh, ow = (out.shape[-2], out.shape[-1]) if out.dim() == 4 else (1, 1)
            ih, iw = x.shape[-2], x.shape[-1]
            kh, kw, st = ih // oh, iw // ow, max(1, ih // oh)
            k = kwargs.get("kernel_size", args[1] if len(args) > 1 and func not in mean_funcs
                           and func not in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                                            F.adaptive_max_pool2d_with_indices) else None)
            if k is not None:
                kh, kw = _pair(k)
                s = kwargs.get("stride", args[2] if len(args) > 2 else None)
                st = _pair(s)[0] if s not in (None, [], ()) else kh
            add(f"{owner}.pool", dict(
                kind="pool", in_ch=x.shape[1], out_ch=x.shape[1], in_h=ih, in_w=iw, out_h=oh,
                out_w=ow, kernel_h=kh, kernel_w=kw, stride=st, **ann))
        elif func in add_funcs:
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                    and a.shape == b.shape == out.shape):
                return
            h, w = (out.shape[-2], out.shape[-1]) if out.dim() == 4 else (1, 1)
            add(f"{owner}.add", dict(
                kind="add", in_ch=out.shape[1], out_ch=out.shape[1], in_h=h, in_w=w, out_h=h,
                out_w=w, **ann))

    handles = []
    for mod in model.modules():
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, (nn.LSTM, nn.LSTMCell)):
            handles.append(mod.register_forward_hook(lstm_hook))
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(1)  # one small pass: OpenMP spinning on a busy machine costs 100x
    try:
        x = torch.zeros(tuple(int(d) for d in input_shape))
        with torch.no_grad(), OpSpy():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        torch.set_num_threads(threads)
    # every call its own unique name: `name` if called once, else `name#i` per call
    specs = []
    for base, call, fields in records:
        suffix = fields.pop("suffix", "")
        name = base if ncalls[base] == 1 else f"{base}#{call}"
        specs.append(LayerSpec(name=name + suffix, **{k: int(v) if k in _INT_FIELDS else v
                                                      for k, v in fields.items()}))
    return specs


_INT_FIELDS = {"in_ch", "out_ch", "in_h", "in_w", "out_h", "out_w", "kernel_h", "kernel_w",
               "stride", "padding", "groups"}
