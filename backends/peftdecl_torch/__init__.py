"""peftdecl's torch backend: adapters wrap ``nn.Module`` layers in place and train with autograd.

Listing the backend (``peftdecl.backends()``) reads :class:`TorchBackend.capabilities` without importing torch;
torch is imported when the backend builds an inventory or an engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import Capabilities
from peftdecl.kinds import BackendKinds
from peftdecl.options import EngineOptions
from peftdecl.plan import LAYER_TYPES, ModelInfo
from peftdecl.train.runtime import TrainingFromModules

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from peftdecl.model import AdaptedModel
    from peftdecl_torch.engine import TorchEngine

# every kind that declares torch ops, on every IR layer type it adapts (read live from peftdecl.kinds)
_KINDS = BackendKinds("torch", (*LAYER_TYPES, "parameter"))  # "parameter": LoRA's target_parameters


def _is_torch_module(model: object) -> bool:
    # by name, so that asking whether a model is a torch module never imports torch
    return any(
        cls.__name__ == "Module" and cls.__module__.startswith("torch.nn.modules")
        for cls in type(model).__mro__
    )


class TorchBackend(TrainingFromModules):
    """Runs plans on a torch ``nn.Module``: each targeted layer is replaced by a wrapper holding its adapters."""

    name = "torch"
    package = "peftdecl_torch"
    runtime_class = "TorchTrainingRuntime"
    """peftdecl train/merge/generate run through ``peftdecl_torch.model_io`` and
    ``peftdecl_torch.training.TorchTrainingRuntime``."""
    capabilities = Capabilities.of_kinds(
        _KINDS,
        "autograd",
        # kinds that read the base weight dequantise a bitsandbytes layer's codes per call (quantized.py)
        dequantizes=True,
        devices=("cpu", "cuda"),
        dtypes=("float32", "float64", "bfloat16", "float16"),
        # linear layers of these kinds run hand-written autograd Functions (kinds/_fused.py)
        fused_kernels=tuple(k for k in ("lora", "adalora", "dora", "oft", "vera") if k in _KINDS),
        requires=("torch",),
        quantizations=("bnb_4bit", "bnb_8bit"),
    )

    def accepts(self, model: object) -> bool:
        return _is_torch_module(model)

    def inventory(self, model: nn.Module, **options: object) -> ModelInfo:
        from peftdecl_torch.inventory import check_options, inventory

        check_options(options)
        return inventory(model)

    def create(
        self,
        model: nn.Module,
        info: ModelInfo,
        book: AdapterBook,
        options: EngineOptions,
        **model_options: bool,
    ) -> TorchEngine:
        """A :class:`peftdecl_torch.engine.TorchEngine` reading ``book``; ``model_options``:
        ``autocast_adapter_dtype``."""
        from peftdecl_torch.engine import TorchEngine
        from peftdecl_torch.inventory import check_options

        check_options(model_options)
        return TorchEngine(model, info, book, options, **model_options)

    def write_adapter_in_place(
        self, engine: TorchEngine, name: str, values: Mapping[str, Mapping[str, np.ndarray]]
    ) -> None:
        """Hot-swap: copy ``values`` (module -> tensor -> array) into adapter ``name``'s live parameters."""
        from peftdecl_torch.hotswap import write_in_place

        write_in_place(engine, name, values)

    def dare_keep_masks(
        self, engine: TorchEngine, adapters: Sequence[str]
    ) -> Callable[[str], Callable[[tuple[int, ...], float], np.ndarray]]:
        """module -> DARE's keep-mask source: torch's global generator on the device and in the dtype of the
        layer's adapter tensors, as HF PEFT draws it."""
        from peftdecl_torch.dare_masks import layer_keep_masks

        return layer_keep_masks(engine, adapters)

    def combination_svd(
        self, matrix: np.ndarray, full_matrices: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """add_weighted_adapter's SVD: torch.linalg.svd in float32, as HF PEFT takes it, so that svd_clamp's
        quantile sees PEFT's singular-vector signs (returned in float64)."""
        from peftdecl_torch.combine_svd import float32_svd

        return float32_svd(matrix, full_matrices)

    def seed_dare(self, seed: int) -> None:
        """Seed torch's global generator, which add_weighted_adapter's DARE masks draw from (a recipe's seed)."""
        import torch

        torch.manual_seed(seed)

    def export_onnx(
        self, model: AdaptedModel, path: Path, batches: Sequence[np.ndarray], external_data: bool | None
    ) -> list[np.ndarray]:
        """``peftdecl export --format onnx``: merge, ``torch.onnx.export``, return torch's logits on ``batches``."""
        from peftdecl_torch.onnx_export import export_onnx

        return export_onnx(model, path, batches, external_data)

    def load_checkpoint(self, directory: str | Path) -> nn.Module:
        """A transformers causal LM from a local HF checkpoint folder, float32, in eval mode (``peftdecl equiv``)."""
        from peftdecl_torch.inventory import load_checkpoint

        return load_checkpoint(directory)


__all__ = ["TorchBackend"]
