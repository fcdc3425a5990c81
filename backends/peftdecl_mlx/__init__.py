"""peftdecl's MLX backend: adapters wrap ``mlx.nn.Module`` layers in place (mlx-lm models included) and train
with ``mx.value_and_grad`` and ``mlx.optimizers``; Metal on Apple silicon, the CPU build elsewhere.

Listing the backend reads :class:`MlxBackend.capabilities` without importing mlx; mlx is imported when the backend
builds an inventory or an engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import Capabilities
from peftdecl.kinds import BackendKinds
from peftdecl.options import EngineOptions
from peftdecl.plan import ModelInfo
from peftdecl.train.runtime import TrainingFromModules

if TYPE_CHECKING:
    from collections.abc import Mapping

    import mlx.nn as nn
    import numpy as np

    from peftdecl_mlx.engine import MlxEngine

WRAPPED_LAYER_TYPES = ("linear", "embedding")
"""mlx-lm models hold nn.Linear and nn.Embedding only: the layer types this backend wraps."""
# every kind that declares MLX ops, on the wrapped layer types it adapts (read live from peftdecl.kinds)
_KINDS = BackendKinds("mlx", WRAPPED_LAYER_TYPES)


def _is_mlx_module(model: object) -> bool:
    # by name, so that asking whether a model is an MLX module never imports mlx
    return any(
        cls.__name__ == "Module" and cls.__module__.startswith("mlx.nn") for cls in type(model).__mro__
    )


class MlxBackend(TrainingFromModules):
    """Runs plans on an ``mlx.nn.Module``: each targeted layer is replaced by a wrapper holding its adapters."""

    name = "mlx"
    package = "peftdecl_mlx"
    runtime_class = "MlxTrainingRuntime"
    """peftdecl train/merge/generate run through ``peftdecl_mlx.model_io`` and
    ``peftdecl_mlx.training.MlxTrainingRuntime``."""
    # over nn.QuantizedLinear / QuantizedEmbedding in affine mode every kind runs: the base output is the layer's
    # quantised product, kinds that read W dequantise it on the fly (peftdecl_mlx.quantized); MLX's floating-point
    # modes (mlx_mxfp4, mlx_nvfp4, mlx_mxfp8) are refused at attach, naming the layer
    capabilities = Capabilities.of_kinds(
        _KINDS,
        "autograd",
        dequantizes=True,
        devices=("cpu", "gpu"),
        dtypes=("float32", "bfloat16", "float16"),
        requires=("mlx",),
        quantizations=("mlx_affine",),
    )

    def accepts(self, model: object) -> bool:
        return _is_mlx_module(model)

    def inventory(self, model: nn.Module, **options: object) -> ModelInfo:
        from peftdecl_mlx.inventory import check_options, inventory

        check_options(options)
        return inventory(model)

    def create(
        self,
        model: nn.Module,
        info: ModelInfo,
        book: AdapterBook,
        options: EngineOptions,
        **model_options: str,
    ) -> MlxEngine:
        """An engine adapting ``model`` in place, reading ``book``; ``model_options``: ``adapter_dtype``."""
        from peftdecl_mlx.engine import MlxEngine
        from peftdecl_mlx.inventory import check_options

        check_options(model_options)
        return MlxEngine(model, info, book, options, **model_options)

    def write_adapter_in_place(
        self, engine: MlxEngine, name: str, values: Mapping[str, Mapping[str, np.ndarray]]
    ) -> None:
        """Hot-swap: adapter ``name``'s arrays take their old slots (module -> tensor -> array), so ``mx.compile``
        does not retrace."""
        from peftdecl_mlx.hotswap import write_in_place

        write_in_place(engine, name, values)

    def load_checkpoint(self, directory: str | Path) -> nn.Module:
        """An mlx-lm model loaded from a local HF checkpoint folder (used by ``peftdecl equiv``)."""
        from peftdecl_mlx.inventory import load_checkpoint

        return load_checkpoint(directory)


__all__ = ["MlxBackend"]
