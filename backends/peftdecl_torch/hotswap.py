"""Writing a hot-swapped adapter's values into its live torch tensors (see :mod:`peftdecl.hotswap`).

``copy_`` under ``no_grad`` keeps each tensor's identity, shape, dtype and device, so a compiled graph (which
guards on those, not on values) and an optimizer holding the parameters both keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def write_in_place(engine: Any, name: str, values: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Copy ``values`` (module -> tensor name -> array) into adapter ``name``'s tensors of each module."""
    with torch.no_grad():
        for module, arrays in values.items():
            layer = engine.layer(module)
            live = layer.tensors(name)
            for tensor_name, value in arrays.items():
                target = live[tensor_name]
                target.copy_(torch.from_numpy(np.asarray(value)).to(device=target.device, dtype=target.dtype))
            layer.replace_plan(name, layer.plan(name))  # same plan: drops caches built from the old values
