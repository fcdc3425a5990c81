"""LoRA on nn.MultiheadAttention in the NumPy reference: an INPUT map of the stacked weight, W' = W + ΔW with
ΔW = [s · B_in A_in ; s_out · B_out A_out] (s_out = 2s, PEFT 0.21's; :mod:`peftdecl.plan.kinds.lora_mha`), then
self-attention on W' (:class:`peftdecl_numpy.mha.MhaLayer`). Gradients: dL/dW' from the attention's backward,
then dA = s Bᵀ dW'_part, dB = s dW'_part Aᵀ for each projection (out_proj's with ``out_proj_grad_scaling``, s,
not the 2s of its value: PEFT 0.21 adds the second s·B A outside autograd).
"""

from __future__ import annotations

from typing import Literal, cast

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.lora_mha import OUT_PROJ_PREFIX
from peftdecl_numpy.kinds.base import ComposingKind, MergeCache, Params, Tape, Weights
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.mha import MhaLayer
from peftdecl_numpy.xp_ops import Array

IN_A, IN_B = "lora_A.weight", "lora_B.weight"
OUT_A, OUT_B = OUT_PROJ_PREFIX + IN_A, OUT_PROJ_PREFIX + IN_B


def _scalings(lp: LayerPlan) -> tuple[float, float]:
    return lp.scaling, float(lp.options["out_proj_scaling"])


class LoraMhaKind(ComposingKind):
    kind = "lora_mha"
    input_order: Literal["active", "reversed"] = "active"  # W + Σ ΔW: the order does not matter

    def composition(self, lp: LayerPlan) -> Literal["output", "input"]:
        return "input"

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        s_in, s_out = _scalings(lp)
        return layer.xp.concat([s_in * (p[IN_B] @ p[IN_A]), s_out * (p[OUT_B] @ p[OUT_A])], axis=0)

    def compose_weight_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, weight: Array
    ) -> tuple[Array, Tape]:
        return weight + self.delta_weight(lp, layer, p), {}

    def compose_weight_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_weight: Array
    ) -> tuple[Array, Params]:
        s_in, s_out = lp.scaling, float(lp.options["out_proj_grad_scaling"])
        split = lp.layer.out_features
        d_in, d_out = d_weight[:split], d_weight[split:]
        grads = {
            IN_A: s_in * (p[IN_B].T @ d_in),
            IN_B: s_in * (d_in @ p[IN_A].T),
            OUT_A: s_out * (p[OUT_B].T @ d_out),
            OUT_B: s_out * (d_out @ p[OUT_A].T),
        }
        return d_weight, grads

    def record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        weight, _ = self.compose_weight_record(lp, layer, p, layer.weight)
        return layer.forward(x, weight=weight), {"x": x, "weight": weight}

    def backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array | None, Params]:
        dx, d_weight = cast(MhaLayer, layer).grads(tape["x"], dy, tape["weight"])
        return dx, self.compose_weight_backward(lp, layer, p, {}, d_weight)[1]

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        return layer.weight + self.delta_weight(lp, layer, p), layer.bias

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        return layer.weight - self.delta_weight(lp, layer, p), layer.bias


OPS = LoraMhaKind()
