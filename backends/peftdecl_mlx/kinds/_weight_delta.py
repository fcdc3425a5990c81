"""Adapters that add a rebuilt weight (LoHa, LoKr) on MLX: Δy = x (m ⊙ ΔW)ᵀ, ΔW recomputed every call.

Training only: module dropout skips ΔW when u ≤ p; rank dropout keeps row o of ΔW where u_o > p, the mask divided
by its mean where the kind asks for it (the NumPy reference's draws, in the same order: module first, then rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import AdditiveKind, Params

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


class WeightDeltaOps(AdditiveKind):
    """Forward and merging for a kind whose whole effect is an additive ΔW (scaling included)."""

    def __init__(
        self,
        kind: str,
        delta_weight_fn: Callable[[LayerPlan, Params], mx.array],
        renormalises_rank_dropout: Callable[[LayerPlan], bool],
    ) -> None:
        self.kind = kind
        self._delta_weight = delta_weight_fn
        self._renormalises = renormalises_rank_dropout

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """Δy = x (m ⊙ ΔW)ᵀ, zero when module dropout skips it."""
        skip_p, rank_p = lp.options["module_dropout"], lp.options["rank_dropout"]
        if layer.training and skip_p > 0 and float(np.array(layer.random(()))) <= skip_p:
            return mx.zeros((*x.shape[:-1], lp.layer.out_features), dtype=x.dtype)
        w = self._delta_weight(lp, p)
        if layer.training and rank_p > 0:
            keep = (layer.random((w.shape[0],)) > rank_p).astype(w.dtype)
            if self._renormalises(lp):
                mean = mx.mean(keep)
                # an all-dropped ΔW contributes nothing (HF PEFT would divide 0 by 0)
                keep = mx.where(mean > 0, keep / mx.maximum(mean, 1e-30), keep)
            w = w * keep[:, None]
        return x @ w.T

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """ΔW, scaling included."""
        return self._delta_weight(lp, p)
