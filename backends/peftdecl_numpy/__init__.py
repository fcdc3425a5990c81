"""peftdecl's NumPy backend: the float64 reference every other backend is tested against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from peftdecl.backend import Capabilities
from peftdecl.plan import ModelInfo
from peftdecl_numpy.kinds import supported_kinds

_KINDS = supported_kinds()
_ADDITIVE = tuple(k for k in ("lora", "adalora", "loha", "lokr", "vera") if k in _KINDS)
# every layer kind composes with the others on a layer (peftdecl_numpy.compose); prompt learning has no layers
_LAYER_KINDS = tuple(k for k in _KINDS if k not in ("prefix_tuning", "prompt_tuning"))


class NumpyBackend:
    """Runs plans on a state dict (a mapping of names to NumPy arrays), in float64, with explicit gradients."""

    name = "numpy"
    capabilities = Capabilities(
        name="numpy",
        kinds=_KINDS,
        gradients="explicit",
        devices=("cpu",),
        dtypes=("float64",),
        mixed_batch=_ADDITIVE,
        multi_active=_LAYER_KINDS,
        requires=("numpy",),
    )

    def accepts(self, model: Any) -> bool:
        return isinstance(model, Mapping) and all(
            isinstance(v, (np.ndarray, np.generic, list)) for v in list(model.values())[:8]
        )

    def inventory(self, model: Any, **options: Any) -> ModelInfo:
        from peftdecl_numpy.engine import inventory

        return inventory(model, **options)

    def create(self, model: Any, info: ModelInfo, **options: Any) -> Any:
        from peftdecl_numpy.engine import NumpyEngine

        return NumpyEngine(model, info)


__all__ = ["NumpyBackend"]
