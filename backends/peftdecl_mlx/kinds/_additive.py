"""What every additive kind (y = base(x) + Δ(x)) shares on MLX: its whole output alone and its merge, W ± ΔW.

A kind supplies ``delta`` and ``delta_weight`` (:class:`peftdecl.backend.AdditiveOps`); it may also supply
``alone(lp, layer, p, x) -> y | None``, the whole output computed faster than base + Δ where it can (LoRA's fused
functions), None where it cannot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl_mlx import compose
from peftdecl_mlx.kinds._protocols import MergeCache, Params

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


class AdditiveKind:
    """Base of the additive kinds' ops: ``forward``, ``merge`` and ``unmerge`` from ``delta``/``delta_weight``."""

    kind: str
    additive = True

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """Δ(x) in the adapter dtype (``x`` already cast)."""
        raise NotImplementedError

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """ΔW in the IR layout."""
        raise NotImplementedError

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """y = base(x) + Δ(x) with this adapter alone (its ``alone`` fast path first, where it has one)."""
        alone = getattr(self, "alone", None)
        y = None if alone is None else alone(lp, layer, p, x)
        return y if y is not None else compose.forward(layer, x, [compose.Running(lp, self, p)])

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(W + ΔW, b)."""
        return layer.weight + self.delta_weight(lp, layer, p), self.merged_bias(lp, layer, p, 1.0)

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(W − ΔW, b)."""
        return layer.weight - self.delta_weight(lp, layer, p), self.merged_bias(lp, layer, p, -1.0)

    def merged_bias(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, sign: float) -> mx.array | None:
        """The bias after merging (``sign`` 1) or unmerging (−1): the base's own unless the kind adds to it."""
        return layer.bias
