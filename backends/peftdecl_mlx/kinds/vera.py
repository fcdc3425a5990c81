"""VeRA (Kopiczko et al., 2024) on MLX: Δy = λ_b ⊙ B (λ_d ⊙ A dropout(x)), ΔW = diag(λ_b) B diag(λ_d) A.

A and B are the shared frozen projections cut to the layer, A[:r, :in] and B[:out, :r]; there is no scaling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import AdditiveKind, Params

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


def _projections(lp: LayerPlan, p: Params) -> tuple[mx.array, mx.array]:
    return p["vera_A"][: lp.r, : lp.layer.in_features], p["vera_B"][: lp.layer.out_features, : lp.r]


class VeraOps(AdditiveKind):
    kind = "vera"

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """Δy = λ_b ⊙ B (λ_d ⊙ A dropout(x))."""
        a, b = _projections(lp, p)
        h = layer.dropout(x, lp.options["dropout"])
        return p["vera_lambda_b"] * ((p["vera_lambda_d"] * (h @ a.T)) @ b.T)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """ΔW = diag(λ_b) B diag(λ_d) A."""
        a, b = _projections(lp, p)
        return (p["vera_lambda_b"][:, None] * b) @ (p["vera_lambda_d"][:, None] * a)


OPS = VeraOps()
