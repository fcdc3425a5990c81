"""What the additive kinds share on torch: merging W ± ΔW, and Δ(x) with or without a result to add into.

A kind that subclasses :class:`FoldedMerge` writes only ``delta_weight`` (and ``merged_bias`` where the adapter
has a bias of its own); one that subclasses :class:`AddedProduct` writes one ``_apply(lp, layer, p, x, result)``
that returns Δ(x) for ``result`` None and result + Δ(x) otherwise, so that its last product can add into the result
(one ``addmm``) instead of allocating Δ(x) and adding it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peftdecl.plan import LayerPlan

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


Params = dict[str, torch.Tensor]


class FoldedMerge:
    """merge: (W + ΔW, b'); unmerge: (W − ΔW, b'), ΔW from ``delta_weight`` cast to the base weight's dtype."""

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        raise NotImplementedError

    def merged_bias(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, sign: float) -> torch.Tensor | None:
        """The layer bias with the adapter's own bias added (``sign`` +1) or taken out (−1); None: unchanged."""
        return None

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = layer.weight_ir()
        return weight + self.delta_weight(lp, layer, p).to(weight.dtype), self.merged_bias(lp, layer, p, +1.0)

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = layer.weight_ir()
        return weight - self.delta_weight(lp, layer, p).to(weight.dtype), self.merged_bias(lp, layer, p, -1.0)


class AddedProduct(FoldedMerge):
    """Δ(x) and result + Δ(x) from one ``_apply``; the whole output unfused is ``accumulate`` on base(x)."""

    def _apply(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        return self._apply(lp, layer, p, x, None)

    def accumulate(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor
    ) -> torch.Tensor:
        """result + Δ(x), the last product adding into the result where the kind can."""
        return self._apply(lp, layer, p, x, result)

    def unfused(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        """base(x) + Δ(x): the whole output where no fused Function applies."""
        return self._apply(lp, layer, p, x, layer.base_forward(x))
