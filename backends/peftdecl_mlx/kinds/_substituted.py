"""LoRA on MLX run on substituted factors (KaSA's diag(d) A, BD-LoRA's dense block-diagonal factor): the variant
writes ``substitute(lp, p)``; MLX's autograd carries the gradients back to the stored tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import Params
from peftdecl_mlx.kinds.lora import LoraOps

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


class SubstitutedLora(LoraOps):
    """LoRA's ops on ``substitute(lp, p)`` in place of the layer's tensors."""

    def substitute(self, lp: LayerPlan, p: Params) -> Params:
        raise NotImplementedError

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        return super().delta(lp, layer, self.substitute(lp, p), x)

    def alone(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array | None:
        return super().alone(lp, layer, self.substitute(lp, p), x)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        return super().delta_weight(lp, layer, self.substitute(lp, p))
