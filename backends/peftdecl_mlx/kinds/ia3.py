"""IA3 (Liu et al., 2022) on MLX: y = l ⊙ (W x + b) for attention-type layers, y = W (l ⊙ x) + b for feed-forward.

Merge: W' = diag(l) W and b' = l ⊙ b (rows), or W' = W diag(l) (columns). Unmerge divides by l + 1e-8 as HF PEFT.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from peftdecl.plan import LayerPlan

Params = dict[str, mx.array]
UNMERGE_EPS = 1e-8  # HF PEFT's guard against division by zero


class IA3Ops:
    kind = "ia3"
    # several active IA3 adapters multiply their vectors in HF PEFT; they are not summed contributions
    additive = False

    def forward(self, lp: LayerPlan, layer: Any, p: Params, x: mx.array) -> mx.array:
        scale = p["ia3_l"].reshape(-1)
        if lp.options["feedforward"]:
            return layer.base_forward(x * scale)
        return layer.base_forward(x) * scale

    def merge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return self._scaled(lp, layer, p["ia3_l"].reshape(-1))

    def unmerge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return self._scaled(lp, layer, 1.0 / (p["ia3_l"].reshape(-1) + UNMERGE_EPS))

    @staticmethod
    def _scaled(lp: LayerPlan, layer: Any, factor: mx.array) -> tuple[mx.array, mx.array | None]:
        if lp.options["feedforward"]:
            return layer.weight * factor[None, :], layer.bias
        bias = None if layer.bias is None else layer.bias * factor
        return layer.weight * factor[:, None], bias


OPS = IA3Ops()
