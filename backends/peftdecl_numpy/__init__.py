"""peftdecl's NumPy backend: the float64 reference every other backend is tested against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from peftdecl.backend import Capabilities
from peftdecl.kinds import BackendKinds, additive_kinds, layer_kinds
from peftdecl.plan import LAYER_TYPES, ModelInfo

# every kind that declares NumPy ops, on every IR layer type it adapts (read live from peftdecl.kinds)
_KINDS = BackendKinds("numpy", LAYER_TYPES)


class NumpyBackend:
    """Runs plans on a state dict (a mapping of names to NumPy arrays), in float64, with explicit gradients."""

    name = "numpy"
    capabilities = Capabilities(
        name="numpy",
        kinds=_KINDS,
        gradients="explicit",
        devices=("cpu",),
        dtypes=("float64",),
        mixed_batch=additive_kinds(_KINDS),
        # every layer kind composes with the others on a layer (peftdecl.composition); prompt learning has none
        multi_active=layer_kinds(_KINDS),
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
