"""AdaLoRA (Zhang et al., 2023) on MLX: Δy = s · P (Q ⊙ Λ) dropout(x), ΔW = s · P (Q ⊙ Λ), s = α / (init_r + 1e-5).

P = lora_B, Λ = lora_E (masked by the plan's kept ranks), Q = lora_A.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from peftdecl.plan import LayerPlan

Params = dict[str, mx.array]


def singular_values(lp: LayerPlan, p: Params) -> mx.array:
    """Λ with the triplets outside the plan's rank mask removed."""
    mask = lp.options.get("rank_mask")
    e = p["lora_E"]
    return e if mask is None else e * mx.array(mask, dtype=e.dtype).reshape(-1, 1)


class AdaLoraOps:
    kind = "adalora"
    additive = True

    def delta(self, lp: LayerPlan, layer: Any, p: Params, x: mx.array) -> mx.array:
        h = layer.dropout(x, lp.options["dropout"])
        qe = p["lora_A"] * singular_values(lp, p)
        return (lp.scaling * (h @ qe.T)) @ p["lora_B"].T

    def delta_weight(self, lp: LayerPlan, layer: Any, p: Params) -> mx.array:
        return lp.scaling * (p["lora_B"] @ (p["lora_A"] * singular_values(lp, p)))

    def merge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return layer.weight + self.delta_weight(lp, layer, p), layer.bias

    def unmerge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return layer.weight - self.delta_weight(lp, layer, p), layer.bias


OPS = AdaLoraOps()
