"""AdaLoRA (Zhang et al., 2023) on MLX: Δy = s · P (Q ⊙ Λ) dropout(x), ΔW = s · P (Q ⊙ Λ), s = α / (init_r + 1e-5).

P = lora_B, Λ = lora_E (masked by the plan's kept ranks), Q = lora_A.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import AdditiveKind, Params

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


def singular_values(lp: LayerPlan, p: Params) -> mx.array:
    """Λ with the triplets outside the plan's rank mask removed."""
    mask = lp.options.get("rank_mask")
    e = p["lora_E"]
    return e if mask is None else e * mx.array(mask, dtype=e.dtype).reshape(-1, 1)


class AdaLoraOps(AdditiveKind):
    kind = "adalora"

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """Δy = s · P (Q ⊙ Λ) dropout(x)."""
        h = layer.dropout(x, lp.options["dropout"])
        qe = p["lora_A"] * singular_values(lp, p)
        return (lp.scaling * (h @ qe.T)) @ p["lora_B"].T

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """ΔW = s · P (Q ⊙ Λ)."""
        return lp.scaling * (p["lora_B"] @ (p["lora_A"] * singular_values(lp, p)))


OPS = AdaLoraOps()
