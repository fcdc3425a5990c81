"""Arrow routing on torch (HF PEFT's ``arrow_config``): per token, the top_k of E stacked LoRA experts by |x·p_e|
(p_e the stored prototype of expert e), mixed by a softmax at temperature T: Δ(x) = Σ_e c_e s_e B_e A_e x.
The same equations as the NumPy reference; autograd differentiates through the coefficients. Not mergeable."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import torch

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds._additive import AddedProduct, Params

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


def refuse_merge(lp: LayerPlan) -> NoReturn:
    raise PeftdeclError(f"{lp.module}: an Arrow router cannot be merged: each token mixes its own experts")


class ArrowOps(AddedProduct):
    """Δ(x) of the router; its own lora_A/lora_B (kept for HF PEFT's file) take no part."""

    kind = "arrow"
    additive = True

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        return self.unfused(lp, layer, p, x)

    def _apply(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor | None
    ) -> torch.Tensor:
        a_stack, b_stack, scales = p["arrow_experts_A"], p["arrow_experts_B"], p["arrow_experts_scaling"]
        tokens = x.reshape(-1, x.shape[-1]).to(a_stack.dtype)
        sim = torch.abs(tokens @ p["arrow_prototypes"].to(tokens.dtype).t())
        top_v, top_i = torch.topk(sim, int(lp.options["top_k"]), dim=1)
        score = torch.full_like(sim, float("-inf")).scatter(1, top_i, top_v)
        coeff = torch.softmax(score / float(lp.options["temperature"]), dim=1)
        y = torch.einsum("ter,eor->teo", torch.einsum("tf,erf->ter", tokens, a_stack), b_stack)
        delta = torch.einsum("te,teo->to", coeff * scales[None, :], y)
        delta = layer.dropout(delta, lp.options["dropout"]).reshape(*x.shape[:-1], delta.shape[-1])
        return delta if result is None else result + delta.to(result.dtype)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        refuse_merge(lp)

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        refuse_merge(lp)

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        refuse_merge(lp)


OPS = ArrowOps()
