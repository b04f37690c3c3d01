"""Layer specs: the compute layers of a real `nn.Module`, found by running it, not by a table.

A `LayerSpec` is everything later stages need to cost one layer: its shape and which gates
control its channels. Model builders annotate modules with plain attributes (all optional):

    module.ddi_block    = "stage1.block0"   # block the layer belongs to (default: parent module name)
    module.ddi_role     = "backbone"        # "backbone" | "gate" | "exit"
    module.ddi_out_gate = "stage1.block0.cgate"  # channel gate masking this layer's output channels
    module.ddi_in_gate  = "stage1.block0.cgate"  # channel gate masking this layer's input channels
    module.ddi_layer_gate = "stage1.block0.lgate"  # layer gate that can skip the whole block

so plain torchvision-style models work unannotated and gated models need no special tracing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerSpec:
    name: str  # qualified module name, unique in the model
    kind: str  # "conv" | "linear" | "pool" | "add" | "lstm"
    in_ch: int
    out_ch: int
    in_h: int  # unpadded input height (1 for linear)
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

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the dense layer (pool/add count one op per output element)."""
        if self.kind in ("conv", "linear"):
            return (self.out_h * self.out_w * self.out_ch
                    * (self.in_ch // self.groups) * self.kernel_h * self.kernel_w)
        return self.out_h * self.out_w * self.out_ch

    def as_dict(self) -> dict:
        return asdict(self)
