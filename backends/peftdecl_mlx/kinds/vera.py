"""VeRA (Kopiczko et al., 2024) on MLX: Δy = λ_b ⊙ B (λ_d ⊙ A dropout(x)), ΔW = diag(λ_b) B diag(λ_d) A.

A and B are the shared frozen projections cut to the layer, A[:r, :in] and B[:out, :r]; there is no scaling.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from peftdecl.plan import LayerPlan

Params = dict[str, mx.array]


def _projections(lp: LayerPlan, p: Params) -> tuple[mx.array, mx.array]:
    return p["vera_A"][: lp.r, : lp.layer.in_features], p["vera_B"][: lp.layer.out_features, : lp.r]


class VeraOps:
    kind = "vera"
    additive = True

    def delta(self, lp: LayerPlan, layer: Any, p: Params, x: mx.array) -> mx.array:
        a, b = _projections(lp, p)
        h = layer.dropout(x, lp.options["dropout"])
        return p["vera_lambda_b"] * ((p["vera_lambda_d"] * (h @ a.T)) @ b.T)

    def delta_weight(self, lp: LayerPlan, layer: Any, p: Params) -> mx.array:
        a, b = _projections(lp, p)
        return (p["vera_lambda_b"][:, None] * b) @ (p["vera_lambda_d"][:, None] * a)

    def merge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return layer.weight + self.delta_weight(lp, layer, p), layer.bias

    def unmerge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return layer.weight - self.delta_weight(lp, layer, p), layer.bias


OPS = VeraOps()
