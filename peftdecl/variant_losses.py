"""The extra training losses of LoRA variants (HF PEFT's ``_get_kasa_loss`` and ``_get_monteclora_loss``), looked up
on the backend that runs the model: a kind's ops object offers ``model_loss(model, adapter_names)`` where the
backend can differentiate it (torch for both; MLX for MonteCLoRA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peftdecl.errors import BackendError, PeftdeclError
from peftdecl.kinds import ops_for


def variant_loss(model: Any, kind: str, adapter_names: str | Sequence[str] | None = None) -> Any:
    """The regulariser of ``kind`` (``kasa``: Σ β‖d‖² + γ(‖BᵀB − I‖ + ‖AAᵀ − I‖) over its layers; ``monteclora``:
    the mean over its layers of the KL terms of the last training draw) for ``adapter_names`` (default: the active
    adapters), to add to the task loss; 0.0 where no such adapter is among them."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    backend = model.backend.name
    try:
        ops = ops_for(kind, backend)
    except BackendError as exc:
        raise PeftdeclError(f"the {kind} loss: {exc}") from exc
    loss = getattr(ops, "model_loss", None)
    if loss is None:
        raise PeftdeclError(
            f"the {backend} backend does not compute the {kind} loss (the torch backend does)"
        )
    return loss(model, names)
