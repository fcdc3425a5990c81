"""peftdecl's torch backend: adapters wrap ``nn.Module`` layers in place and train with autograd.

Listing the backend (``peftdecl.backends()``) reads :class:`TorchBackend.capabilities` without importing torch;
torch is imported when the backend builds an inventory or an engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftdecl.backend import Capabilities
from peftdecl.plan import ModelInfo
from peftdecl_torch.kinds import ADDITIVE_KINDS, supported_kinds

_KINDS = supported_kinds()
_ADDITIVE = tuple(k for k in ADDITIVE_KINDS if k in _KINDS)
# every layer kind composes with the others on a layer (peftdecl.composition); prompt learning has no layers
_LAYER_KINDS = tuple(k for k in _KINDS if k not in ("prefix_tuning", "prompt_tuning"))


def _is_torch_module(model: Any) -> bool:
    # by name, so that asking whether a model is a torch module never imports torch
    return any(
        cls.__name__ == "Module" and cls.__module__.startswith("torch.nn.modules")
        for cls in type(model).__mro__
    )


class TorchBackend:
    """Runs plans on a torch ``nn.Module``: each targeted layer is replaced by a wrapper holding its adapters."""

    name = "torch"
    capabilities = Capabilities(
        name="torch",
        kinds=_KINDS,
        gradients="autograd",
        devices=("cpu", "cuda"),
        dtypes=("float32", "float64", "bfloat16", "float16"),
        mixed_batch=_ADDITIVE,
        multi_active=_LAYER_KINDS,
        # linear layers of these kinds run hand-written autograd Functions (kinds/_fused.py)
        fused_kernels=tuple(k for k in ("lora", "adalora", "dora", "oft", "vera") if k in _KINDS),
        requires=("torch",),
    )

    def accepts(self, model: Any) -> bool:
        return _is_torch_module(model)

    def inventory(self, model: Any, **options: Any) -> ModelInfo:
        from peftdecl_torch.inventory import check_options, inventory

        check_options(options)
        return inventory(model)

    def create(self, model: Any, info: ModelInfo, **options: Any) -> Any:
        from peftdecl_torch.engine import TorchEngine
        from peftdecl_torch.inventory import check_options

        check_options(options)
        return TorchEngine(model, info, **options)

    def load_checkpoint(self, directory: str | Path) -> Any:
        """A transformers causal LM from a local HF checkpoint folder, float32, in eval mode (``peftdecl equiv``)."""
        from peftdecl_torch.inventory import load_checkpoint

        return load_checkpoint(directory)


__all__ = ["TorchBackend"]
