"""Adapters that add a rebuilt weight (LoHa, LoKr) on MLX: Δy = x (m ⊙ ΔW)ᵀ, ΔW recomputed every call.

Training only: module dropout skips ΔW when u ≤ p; rank dropout keeps row o of ΔW where u_o > p, the mask divided
by its mean where the kind asks for it (the NumPy reference's draws, in the same order: module first, then rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from peftdecl.plan import LayerPlan

Params = dict[str, mx.array]


@dataclass(frozen=True)
class WeightDeltaOps:
    """Forward and merging for a kind whose whole effect is an additive ΔW (scaling included)."""

    kind: str
    delta_weight_fn: Callable[[LayerPlan, Params], mx.array]
    renormalises_rank_dropout: Callable[[LayerPlan], bool]
    additive: bool = True

    def delta(self, lp: LayerPlan, layer: Any, p: Params, x: mx.array) -> mx.array:
        skip_p, rank_p = lp.options["module_dropout"], lp.options["rank_dropout"]
        if layer.training and skip_p > 0 and float(layer.random(()).item()) <= skip_p:
            return mx.zeros((*x.shape[:-1], lp.layer.out_features), dtype=x.dtype)
        w = self.delta_weight_fn(lp, p)
        if layer.training and rank_p > 0:
            keep = (layer.random((w.shape[0],)) > rank_p).astype(w.dtype)
            if self.renormalises_rank_dropout(lp):
                mean = mx.mean(keep)
                # an all-dropped ΔW contributes nothing (HF PEFT would divide 0 by 0)
                keep = mx.where(mean > 0, keep / mx.maximum(mean, 1e-30), keep)
            w = w * keep[:, None]
        return x @ w.T

    def delta_weight(self, lp: LayerPlan, layer: Any, p: Params) -> mx.array:
        return self.delta_weight_fn(lp, p)

    def merge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return layer.weight + self.delta_weight_fn(lp, p), layer.bias

    def unmerge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return layer.weight - self.delta_weight_fn(lp, p), layer.bias
