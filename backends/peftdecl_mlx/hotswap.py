"""Writing a hot-swapped adapter's values into the live MLX module tree (see :mod:`peftdecl.hotswap`).

MLX arrays are immutable, so "in place" means: each new array takes the old one's slot (same key in the same
``AdapterParams`` module, same shape and dtype). The model's parameter tree keeps its structure and key order, so
a function compiled with ``mx.compile(fn, inputs=model.state)`` reads the new arrays on its next call without a
retrace, and an optimizer's state keyed by parameter path stays valid. Rebuilding the adapter instead would
re-insert it after the layer's other adapters and reorder the flattened inputs a compiled graph binds by position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import numpy as np

from peftdecl.errors import PeftdeclError


def write_in_place(engine: Any, name: str, values: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Put ``values`` (module -> tensor name -> array) into adapter ``name``'s slots, cast to each slot's dtype.

    Every shape is checked before the first write, so a mismatch leaves the model unchanged."""
    writes = []
    for module, arrays in values.items():
        layer = engine.layer(module)
        params = layer.adapters[name]
        live = params.tensors()
        for tensor, value in arrays.items():
            old = live[tensor]
            if tuple(np.shape(value)) != tuple(old.shape):
                raise PeftdeclError(
                    f"hotswap: {module}.{tensor} has shape {list(np.shape(value))}, the slot {list(old.shape)}"
                )
            writes.append((layer, params, tensor, value, old.dtype))
    for _, params, tensor, value, dtype in writes:
        # through float32, the precision the engine creates adapter arrays in before its adapter dtype
        params.overwrite(tensor, mx.array(np.asarray(value, dtype=np.float32), dtype=dtype))
    for layer in {id(w[0]): w[0] for w in writes}.values():
        layer.replace_plan(name, layer.adapter_state.plans[name])  # same plan: drops results memoised on it
    mx.eval([params.tensors() for _, params, *_ in writes])
