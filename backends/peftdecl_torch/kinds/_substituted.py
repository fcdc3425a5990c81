"""LoRA run on substituted factors: a variant whose update is LoRA's with A or B computed from its tensors (KaSA's
diag(d) A, BD-LoRA's dense block-diagonal factor) writes ``substitute(lp, p)``; autograd carries the gradients
back to the stored tensors. Every entry point of LoRA's ops is wrapped once, so the substitution happens once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds._additive import Params
from peftdecl_torch.kinds.lora import LoraOps

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


class SubstitutedLora(LoraOps):
    """LoRA's ops on ``substitute(lp, p)`` in place of the layer's tensors."""

    def substitute(self, lp: LayerPlan, p: Params) -> Params:
        raise NotImplementedError

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        return super().forward(lp, layer, self.substitute(lp, p), x)

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        return super().delta(lp, layer, self.substitute(lp, p), x)

    def accumulate(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor
    ) -> torch.Tensor:
        return super().accumulate(lp, layer, self.substitute(lp, p), x, result)

    def unfused(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        return super().unfused(lp, layer, self.substitute(lp, p), x)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        return super().delta_weight(lp, layer, self.substitute(lp, p))
