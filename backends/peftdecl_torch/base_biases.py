"""The base biases an adapter trains (HF PEFT's ``bias`` option), found and written by PEFT's key names.

A key names the bias as PEFT saves it: ``<module>.base_layer.bias`` for a layer wrapped by an adapter,
``<module>.bias`` otherwise. Wrapping changes a bias's path, so a key is looked up in both forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from peftdecl.bias_training import BASE_LAYER
from peftdecl.errors import PeftdeclError


def bias_names(base_names: Iterable[str]) -> list[str]:
    """The base model's parameters PEFT's ``bias="all"`` trains: every one whose name contains ``bias``."""
    return [name for name in base_names if "bias" in name]


def live_bias(model: nn.Module, key: str) -> nn.Parameter:
    """The parameter ``key`` names, whether or not its layer is wrapped now."""
    module, _, leaf = key.rpartition(".")
    bare = module.removesuffix(BASE_LAYER)
    for candidate in (key, f"{bare}.{leaf}", f"{bare}{BASE_LAYER}.{leaf}"):
        try:
            return model.get_parameter(candidate)
        except AttributeError:
            continue
    raise PeftdeclError(f"{key}: the model has no such bias parameter")


def write_biases(model: nn.Module, biases: Mapping[str, np.ndarray]) -> None:
    """Copy each saved bias into the model's parameter, in the parameter's dtype and device."""
    for key, value in biases.items():
        param = live_bias(model, key)
        array = np.asarray(value)
        if tuple(array.shape) != tuple(param.shape):
            raise PeftdeclError(f"{key}: shape {list(array.shape)} does not fit the bias {list(param.shape)}")
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(param.dtype))
