"""IA3 (Liu et al., 2022) on torch: y = l ⊙ (W x + b) for attention-type layers, y = W (l ⊙ x) + b for
feed-forward ones (the bias is scaled in the first form, as in HF PEFT).

Merge folds l into the weight (rows, or input columns per group); unmerge divides by l + 1e-8 as HF PEFT does.
Several active adapters multiply their vectors (peftdecl.composition), each on its own side (HF PEFT's layer keeps
the first adapter's feed-forward flag for all of them).

The work beyond the base layer is one pass over the output (forward) and two over dy (backward), as in HF PEFT;
inference scales the base output in place (docs/performance.md compares the alternatives).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl_torch import cuda_kernels

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


Params = dict[str, torch.Tensor]
UNMERGE_EPS = 1e-8  # HF PEFT's guard against division by zero


def _on_features(lp: LayerPlan, l_vec: torch.Tensor) -> torch.Tensor:
    # the stored (1, C, 1, 1) broadcasts over [N, C, H, W]; linear vectors act on the last axis
    return l_vec if lp.layer.is_conv else l_vec.reshape(-1)


class IA3Ops:
    """IA3's :class:`peftdecl.backend.ComposingOps`: OUTPUT (y ↦ l ⊙ y), or INPUT for feed-forward layers."""

    kind = "ia3"
    additive = False
    input_order = "active"  # diagonal scalings commute: any order gives the same product

    composition = staticmethod(compositions.ia3)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """l ⊙ y for the output so far y (bias included), as HF PEFT multiplies the active vectors."""
        return y * _on_features(lp, p["ia3_l"])

    def compose_weight(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: torch.Tensor
    ) -> torch.Tensor:
        """W diag(l): the input scaled per input feature (per input channel of each group)."""
        return weight * self._weight_factor(lp, p["ia3_l"])

    @cuda_kernels.replaces("ia3_forward")
    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        scale = _on_features(lp, p["ia3_l"])
        if lp.options["feedforward"]:
            return layer.base_forward((x.to(scale.dtype) * scale).to(x.dtype))
        y = layer.base_forward(x)
        if not torch.is_grad_enabled():
            # the base layer's own fresh output: no second tokens × out tensor; a half y is multiplied in float32
            # and rounded once, as HF PEFT's float32 product cast back
            return y.mul_(scale)
        return (y * scale).to(y.dtype)  # type promotion: one float32 product for a half y, no up-cast copy

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        """The change merging makes to the current base weight: W ⊙ l − W."""
        return self.merge(lp, layer, p, {})[0] - layer.weight_ir()

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        l_vec = p["ia3_l"]
        return self._scaled(lp, layer, l_vec, l_vec.reshape(-1))

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        l_vec = p["ia3_l"] + UNMERGE_EPS
        return self._scaled(lp, layer, 1.0 / l_vec, 1.0 / l_vec.reshape(-1))

    def _scaled(
        self, lp: LayerPlan, layer: AdaptedLayer, factor: torch.Tensor, bias_factor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = layer.weight_ir()
        merged = (weight.to(factor.dtype) * self._weight_factor(lp, factor)).to(weight.dtype)
        bias = layer.bias
        if lp.options["feedforward"] or bias is None:
            return merged, None
        return merged, (bias.to(factor.dtype) * bias_factor).to(bias.dtype)

    @staticmethod
    def _weight_factor(lp: LayerPlan, l_vec: torch.Tensor) -> torch.Tensor:
        """l broadcast over the IR weight [out, in(/groups), *kernel]: along rows, or along input columns."""
        flat, extra = l_vec.reshape(-1), (1,) * len(lp.layer.kernel_size)
        if not lp.options["feedforward"]:
            return flat.reshape(-1, 1, *extra)
        groups, out = lp.layer.groups, lp.layer.out_features
        if groups == 1:
            return flat.reshape(1, -1, *extra)
        # grouped conv: output channel o of group k reads input channels k·(C/groups) ... (k+1)·(C/groups) − 1
        per_group = flat.reshape(groups, 1, -1, *extra)
        return per_group.expand(groups, out // groups, *per_group.shape[2:]).reshape(out, -1, *extra)


OPS = IA3Ops()
