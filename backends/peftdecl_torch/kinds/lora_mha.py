"""LoRA on nn.MultiheadAttention for the torch backend (:mod:`peftdecl.plan.kinds.lora_mha` has the layout).

The layer handle is a :class:`peftdecl_torch.mha.AdaptedMultiheadAttention`, whose IR weight is in_proj [3E, E]
stacked over out_proj [E, E]. The kind is an INPUT map of that weight, W ↦ W + ΔW with
ΔW = [s · B_in A_in ; s_out · B_out A_out] (s_out = 2s, PEFT 0.21's), added in the base weight's dtype as PEFT's
merge does; the attention then runs once on W'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from peftdecl.backend import Params
from peftdecl.errors import BackendError
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.lora_mha import OUT_PROJ_PREFIX

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


def mha_delta(lp: LayerPlan, p: Params[torch.Tensor]) -> torch.Tensor:
    """ΔW = [s · B_in A_in ; s_out · B_out A_out], [4E, E] in the adapter's dtype; gradients reach B_out and A_out
    through ``out_proj_grad_scaling`` only (PEFT 0.21 adds its second s·B A outside autograd)."""
    inner = p["lora_B.weight"] @ p["lora_A.weight"] * lp.scaling
    outer = p[OUT_PROJ_PREFIX + "lora_B.weight"] @ p[OUT_PROJ_PREFIX + "lora_A.weight"]
    value, grad = float(lp.options["out_proj_scaling"]), float(lp.options["out_proj_grad_scaling"])
    return torch.cat([inner, outer * grad + outer.detach() * (value - grad)])


class LoraMhaOps:
    """:class:`peftdecl.backend.ComposingOps` (INPUT) of ``lora_mha``."""

    kind = "lora_mha"
    additive = False
    input_order: Literal["active", "reversed"] = "active"  # W + Σ ΔW: the order does not matter

    def composition(self, lp: LayerPlan) -> Literal["output", "input"]:
        return "input"

    def forward(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params[torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """Self-attention of x on W + ΔW (the attention's output, without its weights)."""
        weight = self.compose_weight(lp, layer, p, layer.weight_ir())
        out: torch.Tensor = layer.functional(x, weight)
        return out

    def compose_weight(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params[torch.Tensor], weight: torch.Tensor
    ) -> torch.Tensor:
        """W + ΔW, ΔW cast to W's dtype first (PEFT merges the delta in the base weight's dtype)."""
        return weight + mha_delta(lp, p).to(weight.dtype)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params[torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        raise BackendError(f"{lp.module}: LoRA on MultiheadAttention composes on the weights, not the output")

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params[torch.Tensor]) -> torch.Tensor:
        return mha_delta(lp, p)

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params[torch.Tensor], cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.compose_weight(lp, layer, p, layer.weight_ir()), None

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params[torch.Tensor], cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = layer.weight_ir()
        return weight - mha_delta(lp, p).to(weight.dtype), None


OPS = LoraMhaOps()
