"""peftdecl's NumPy backend: the float64 reference every other backend is tested against, written against the
array API so that it also runs on other array namespaces (``xp=``) and dtypes (``dtype=``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import Capabilities
from peftdecl.kinds import BackendKinds
from peftdecl.options import EngineOptions
from peftdecl.plan import LAYER_TYPES, ModelInfo

if TYPE_CHECKING:
    from peftdecl_numpy.engine import NumpyEngine
    from peftdecl_numpy.xp_ops import Namespace

# every kind that declares NumPy ops, on every IR layer type it adapts (read live from peftdecl.kinds); "parameter":
# LoRA's target_parameters, merged into the state dict (peftdecl_numpy.parameters)
_KINDS = BackendKinds("numpy", (*LAYER_TYPES, "parameter"))


class NumpyBackend:
    """Runs plans on a state dict (a mapping of names to NumPy arrays), in float64 unless ``dtype=`` says
    otherwise, on NumPy unless ``xp=`` names another array-API namespace, with explicit gradients. Quantised
    layers (bitsandbytes 4-/8-bit and MLX affine state-dict layouts) run on their dequantised weights; MLX's bits
    and group size come as the model fact ``quantization`` (mlx-lm's config.json entry)."""

    name = "numpy"
    capabilities = Capabilities.of_kinds(
        _KINDS,
        "explicit",
        dequantizes=True,  # a quantised layer computes with its dequantised weight, so every kind runs on it
        devices=("cpu",),
        dtypes=("float64", "float32"),
        requires=("numpy",),
        quantizations=("bnb_4bit", "bnb_8bit", "mlx_affine"),
    )

    def accepts(self, model: object) -> bool:
        return isinstance(model, Mapping) and all(
            isinstance(v, (np.ndarray, np.generic, list)) for v in list(model.values())[:8]
        )

    def inventory(self, model: Mapping[str, npt.ArrayLike], **options: Any) -> ModelInfo:
        """The state dict's layers; ``layer_types`` and model facts as options (``xp``/``dtype`` are the engine's)."""
        from peftdecl_numpy.inventory import inventory

        return inventory(model, **options)

    def create(
        self,
        model: Mapping[str, npt.ArrayLike],
        info: ModelInfo,
        book: AdapterBook,
        options: EngineOptions,
        *,
        xp: Namespace | None = None,
        dtype: str = "float64",
        **model_options: object,
    ) -> NumpyEngine:
        """An engine reading ``book``, on ``xp`` (an array-API namespace, NumPy by default) in ``dtype`` (a dtype
        name, ``float64`` by default); the other ``model_options`` are the inventory's (layer types, facts)."""
        from peftdecl_numpy.engine import NumpyEngine

        return NumpyEngine(model, info, book, options, xp=xp, dtype=dtype)


__all__ = ["NumpyBackend"]
