"""IA3 (Liu et al., 2022) on MLX: y = l ⊙ (W x + b) for attention-type layers, y = W (l ⊙ x) + b for feed-forward.

Merge: W' = diag(l) W and b' = l ⊙ b (rows), or W' = W diag(l) (columns). Unmerge divides by l + 1e-8 as HF PEFT.
Several active adapters multiply their vectors (peftdecl.composition), each on its own side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import mlx.core as mx

from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._protocols import MergeCache, Params

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer

UNMERGE_EPS = 1e-8  # HF PEFT's guard against division by zero


class IA3Ops:
    kind = "ia3"
    # several active IA3 adapters multiply their vectors in HF PEFT; they are not summed contributions
    additive = False
    # diagonal scalings commute: any order gives the same product
    input_order: Literal["active", "reversed"] = "active"

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """y = l ⊙ (W x + b), or W (l ⊙ x) + b for a feed-forward layer."""
        scale = p["ia3_l"].reshape(-1)
        if lp.options["feedforward"]:
            return layer.base_forward(x * scale)
        return layer.base_forward(x) * scale

    composition = staticmethod(compositions.ia3)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array, y: mx.array
    ) -> mx.array:
        """l ⊙ y for the output so far y (bias included), as HF PEFT multiplies the active vectors."""
        return y * p["ia3_l"].reshape(-1)

    def compose_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: mx.array) -> mx.array:
        """W diag(l): the input scaled per input feature."""
        return weight * p["ia3_l"].reshape(-1)[None, :]

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """diag(l) W − W (feed-forward: W diag(l) − W): the merged weight less the current one."""
        return self._scaled(lp, layer, p["ia3_l"].reshape(-1))[0] - layer.weight

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(diag(l) W, l ⊙ b) or (W diag(l), b)."""
        return self._scaled(lp, layer, p["ia3_l"].reshape(-1))

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        return self._scaled(lp, layer, 1.0 / (p["ia3_l"].reshape(-1) + UNMERGE_EPS))

    @staticmethod
    def _scaled(lp: LayerPlan, layer: AdaptedLayer, factor: mx.array) -> tuple[mx.array, mx.array | None]:
        if lp.options["feedforward"]:
            return layer.weight * factor[None, :], layer.bias
        bias = None if layer.bias is None else layer.bias * factor
        return layer.weight * factor[:, None], bias


OPS = IA3Ops()
