"""KaSA (Wang et al., 2024) on torch: LoRA with A' = diag(d) A, so ΔW = s · B diag(d) A; the base weight was
truncated to rank k − r when the adapter was attached (:mod:`peftdecl.lora_variants_init`).

:func:`kasa_loss` is HF PEFT's ``_get_kasa_loss``: Σ over KaSA layers of β Σ d² + γ (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.kasa import DIAG
from peftdecl_torch.kinds._additive import Params
from peftdecl_torch.kinds._substituted import SubstitutedLora
from peftdecl_torch.kinds.variant_layers import variant_layers


class KasaOps(SubstitutedLora):
    kind = "kasa"

    def model_loss(self, model: object, adapter_names: Sequence[str] | None) -> torch.Tensor | float:
        """:func:`kasa_loss` (what ``AdaptedModel._get_kasa_loss`` calls)."""
        return kasa_loss(model, adapter_names)

    def substitute(self, lp: LayerPlan, p: Params) -> Params:
        return {**p, "lora_A.weight": p[DIAG].unsqueeze(1) * p["lora_A.weight"]}


def layer_regulariser(p: Params, beta: float, gamma: float) -> torch.Tensor:
    """β Σ d² + γ (‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) of one layer, in float32 at least (as HF PEFT computes it)."""
    d, a, b = (
        p[name].float() if p[name].dtype.itemsize < 4 else p[name]
        for name in (DIAG, "lora_A.weight", "lora_B.weight")
    )
    eye = torch.eye(d.shape[0], device=d.device, dtype=d.dtype)
    orthogonality = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
    loss: torch.Tensor = beta * (d * d).sum() + gamma * orthogonality
    return loss


def kasa_loss(model: object, adapter_names: Sequence[str] | None = None) -> torch.Tensor | float:
    """The KaSA regulariser summed over the layers of ``adapter_names`` (default: the active adapters) of a
    torch-backend :class:`peftdecl.AdaptedModel`; 0.0 where none is KaSA. Add it to the task loss."""
    total: torch.Tensor | float = 0.0
    for _name, _lp, p, spec in variant_layers(model, "kasa", adapter_names):
        config = spec.kasa_config
        total = total + layer_regulariser(p, config.beta, config.gamma)
    return total


OPS = KasaOps()
