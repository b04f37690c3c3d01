"""Dynamic networks of DDI: gated CIFAR ResNets and DenseNets with early exits, one registry.

    model = create_model("resnet74", layer_gates=True, channel_gates=True, exits=True)
    out = model(x, mode="dense")            # training: masked, differentiable
    out = model.eval()(x, mode="sparse")    # inference: skipped blocks/channels are not computed
"""
from ddi_hw.models.base import DynamicNet
from ddi_hw.models.output import DynamicOutput
from ddi_hw.models.registry import create_model, list_models, register_model

__all__ = ["DynamicNet", "DynamicOutput", "create_model", "list_models", "register_model"]
