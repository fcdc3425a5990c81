"""Base weights of a torch model read and written in the IR layout ``[out, in]``, through the adapted layers where
there are some; a bitsandbytes layer's weight is read dequantised and written back as its own codes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import numpy as np
import torch
from torch import nn

from peftdecl.errors import PeftdeclError
from peftdecl_torch.inventory import layer_type
from peftdecl_torch.layer import AdaptedLayer
from peftdecl_torch.quantized import bnb_kind, dequantized_weight, requantize


def base_weight_ir(
    model: nn.Module, layers: Mapping[str, AdaptedLayer], module: str, key: str | None = None
) -> torch.Tensor:
    """The base weight of ``module`` in the IR layout, as a live view (a quantised layer's: dequantised, a copy);
    ``key`` names the request in errors."""
    if module in layers:
        return layers[module].weight_ir()
    try:
        found = model.get_submodule(module)
    except AttributeError as exc:
        raise PeftdeclError(f"{key or module}: the model has no module {module!r}") from exc
    kind = layer_type(found)
    if kind is None:
        raise PeftdeclError(f"{key or module}: {module} is a {type(found).__name__}, not an adaptable layer")
    if bnb_kind(found) is not None:
        return dequantized_weight(found).detach()
    weight = cast(torch.Tensor, found.weight)
    return weight.T if kind == "gpt2_conv1d" else weight


def write_base_weights(
    model: nn.Module, layers: Mapping[str, AdaptedLayer], weights: Mapping[str, np.ndarray]
) -> None:
    """Store each ``<module>[.base_layer].weight`` of ``weights`` (IR layout) in place, in the layer's own dtype; a
    quantised layer re-quantises it with its own scheme, unless it is the layer's own dequantised weight (PEFT
    saves a targeted head's base), which keeps the codes."""
    for key, value in weights.items():
        module = key.removesuffix(".weight").removesuffix(".base_layer")
        weight_ir = base_weight_ir(model, layers, module, key)
        array = np.asarray(value)
        if tuple(array.shape) != tuple(weight_ir.shape):
            raise PeftdeclError(
                f"{key}: shape {list(array.shape)} does not fit {module}'s weight {list(weight_ir.shape)}"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(weight_ir.dtype)
        found = model.get_submodule(module)
        quantized_base = bnb_kind(found) is not None or (module in layers and layers[module].quantized)
        if quantized_base and torch.equal(tensor, weight_ir):
            continue
        if module in layers:  # in place; a quantised layer's codes are re-quantised
            layers[module].write_base(tensor, None)
        elif bnb_kind(found) is not None:
            requantize(found, tensor)  # its weight_ir was a dequantised copy
        else:
            with torch.no_grad():
                weight_ir.copy_(tensor)
