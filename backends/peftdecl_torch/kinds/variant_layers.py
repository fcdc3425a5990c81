"""The layers of one LoRA variant in a torch-backend model, for the variants' extra training losses (KaSA's and
MonteCLoRA's regularisers, which HF PEFT's ``LoraModel._get_kasa_loss`` / ``_get_monteclora_loss`` give)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan


def variant_layers(
    model: Any, kind: str, adapter_names: Sequence[str] | None = None
) -> Iterator[tuple[str, LayerPlan, dict[str, torch.Tensor], Any]]:
    """(adapter, layer plan, the layer's live tensors, the adapter's spec) for every layer of the adapters of
    execution kind ``kind`` among ``adapter_names`` (default: the active ones) of a torch-backend AdaptedModel."""
    engine = getattr(model, "engine", None)
    if engine is None or not hasattr(engine, "layer"):
        raise PeftdeclError(
            f"{kind} loss: expected a peftdecl AdaptedModel on the torch backend, got {model!r}"
        )
    names = model.active_adapters if adapter_names is None else list(adapter_names)
    for name in names:
        plan = model.adapters[name]
        if plan.kind != kind:
            continue
        for lp in plan.layers:
            yield name, lp, engine.layer(lp.module).tensors(name), plan.spec
