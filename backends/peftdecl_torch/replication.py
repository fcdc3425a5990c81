"""HF PEFT's ``layer_replication`` on torch: the decoder's layer list rebuilt from ranges of its layers, every copy
sharing its parameters with the layer it copies (so each copy can carry its own adapter on the same base weights).

``[[0, 4], [2, 5]]`` turns layers 0…4 into 0, 1, 2, 3, 2, 3, 4, as ``peft.tuners.tuners_utils.replicate_layers``
does: the list is found at ``model(.model)*.layers`` (Llama-like), ``(.bert).encoder.layer`` or ``.h`` (Falcon),
each new entry is a deep copy whose parameters are the original's objects, its ``layer_idx`` attributes are
renumbered and ``config.num_hidden_layers`` becomes the new count.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

from torch import nn

from peftdecl.errors import TargetError


def layer_list(model: nn.Module) -> tuple[nn.Module, nn.Module, str, nn.ModuleList]:
    """(the inner model, the module holding its decoder layers, that attribute's name, the layer list), found as
    HF PEFT finds them."""
    while isinstance(getattr(model, "model", None), nn.Module):
        model = cast(nn.Module, model.model)
    if isinstance(getattr(model, "bert", None), nn.Module):
        model = cast(nn.Module, model.bert)
    for owner_path, attr in (("", "layers"), ("encoder", "layer"), ("", "h")):
        owner = getattr(model, owner_path, None) if owner_path else model
        found = getattr(owner, attr, None) if isinstance(owner, nn.Module) else None
        if isinstance(owner, nn.Module) and isinstance(found, nn.ModuleList):
            return model, owner, attr, found
    raise TargetError(
        "$.layer_replication: found no layer list (model.layers, encoder.layer or h) in "
        f"{type(model).__name__}; HF PEFT replicates Llama-, BERT- and Falcon-like models only"
    )


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are ``module``'s own objects (buffers are copied)."""
    clone = copy.deepcopy(module)
    for name, sub in module.named_modules():
        target = clone.get_submodule(name)
        for pname, param in sub.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone


def replicate_layers(model: nn.Module, layer_map: Sequence[tuple[int, int]]) -> int:
    """Rebuild the layer list from ``layer_map`` ([start, end) ranges of the current layers); returns its length."""
    inner, owner, attr, layers = layer_list(model)
    for i, (start, end) in enumerate(layer_map):
        if not 0 <= start < end <= len(layers):
            raise TargetError(
                f"$.layer_replication[{i}]: [{start}, {end}] is not a range of the model's {len(layers)} layers"
            )
    new_layers: list[nn.Module] = []
    for start, end in layer_map:
        for i in range(start, end):
            clone = shared_copy(layers[i])
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):  # transformers' caches index by it
                    setattr(sub, "layer_idx", len(new_layers))  # noqa: B010 (not every module declares it)
            new_layers.append(clone)
    setattr(owner, attr, nn.ModuleList(new_layers))
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_layers)
    return len(new_layers)
