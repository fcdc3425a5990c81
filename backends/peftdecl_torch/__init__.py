"""peftdecl's torch backend: adapters wrap ``nn.Module`` layers in place and train with autograd.

Listing the backend (``peftdecl.backends()``) reads :class:`TorchBackend.capabilities` without importing torch;
torch is imported when the backend builds an inventory or an engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import Capabilities
from peftdecl.kinds import BackendKinds
from peftdecl.options import EngineOptions
from peftdecl.plan import LAYER_TYPES, ModelInfo

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torch import nn

    from peftdecl.model import AdaptedModel
    from peftdecl.train.config import TrainFile
    from peftdecl.train.runtime import Tokenizer, TrainingRuntime
    from peftdecl_torch.engine import TorchEngine

# every kind that declares torch ops, on every IR layer type it adapts (read live from peftdecl.kinds)
_KINDS = BackendKinds("torch", LAYER_TYPES)


def _is_torch_module(model: object) -> bool:
    # by name, so that asking whether a model is a torch module never imports torch
    return any(
        cls.__name__ == "Module" and cls.__module__.startswith("torch.nn.modules")
        for cls in type(model).__mro__
    )


class TorchBackend:
    """Runs plans on a torch ``nn.Module``: each targeted layer is replaced by a wrapper holding its adapters."""

    name = "torch"
    capabilities = Capabilities.of_kinds(
        _KINDS,
        "autograd",
        devices=("cpu", "cuda"),
        dtypes=("float32", "float64", "bfloat16", "float16"),
        # linear layers of these kinds run hand-written autograd Functions (kinds/_fused.py)
        fused_kernels=tuple(k for k in ("lora", "adalora", "dora", "oft", "vera") if k in _KINDS),
        requires=("torch",),
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

    def load_checkpoint(self, directory: str | Path) -> nn.Module:
        """A transformers causal LM from a local HF checkpoint folder, float32, in eval mode (``peftdecl equiv``)."""
        from peftdecl_torch.inventory import load_checkpoint

        return load_checkpoint(directory)

    # -- optional TrainingBackend methods (peftdecl train / merge / generate) --------------------------------
    def load_pretrained(self, directory: Path, *, device: str, dtype: str) -> tuple[nn.Module, Tokenizer]:
        """A transformers causal LM (``device``: cpu | cuda | auto; ``dtype`` a torch dtype name) and its tokenizer."""
        from peftdecl_torch.model_io import load_pretrained

        return load_pretrained(directory, device=device, dtype=dtype)

    def training_runtime(
        self, model: AdaptedModel, tokenizer: Tokenizer, config: TrainFile
    ) -> TrainingRuntime:
        from peftdecl_torch.training import TorchTrainingRuntime

        return TorchTrainingRuntime(model, tokenizer, config)

    def generate(
        self, model: AdaptedModel, prompt_ids: Sequence[int], max_new_tokens: int, eos: int | None
    ) -> list[int]:
        from peftdecl_torch.model_io import generate

        return generate(model, prompt_ids, max_new_tokens, eos)

    def save_merged(
        self, model: AdaptedModel, tokenizer: Tokenizer, source: Path, out: Path, dtype: str | None
    ) -> None:
        from peftdecl_torch.model_io import save_merged

        save_merged(model, tokenizer, source, out, dtype)


__all__ = ["TorchBackend"]
