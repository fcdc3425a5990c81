"""Adapters that add a rebuilt weight (LoHa, LoKr): y = f(x; W + m ⊙ ΔW) + b, ΔW built once per call.

``f`` is the base layer's own operation. Running one adapter, the base weight and ΔW go through a single matmul or
convolution (autograd keeps the one ΔW for the backward pass); summed with other adapters, f(x; m ⊙ ΔW) is added.
On a half-precision linear base with float32 factors ΔW is applied in the base dtype (HF PEFT multiplies every
input in float32 instead). Training only: module dropout skips ΔW with probability p; rank dropout multiplies
each output row of ΔW by a Bernoulli keep-mask m, divided by its mean where the kind asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds._additive import FoldedMerge, Params

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


def rebuild_cp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CP rebuild of a conv kernel: P[o, c, k, l] = Σ_ij t[i, j, k, l] · a[i, o] · b[j, c]."""
    return torch.einsum("ijkl,io,jc->ockl", t, a, b)


def rank_keep(
    layer: AdaptedLayer, rows: int, p: float, renormalise: bool, like: torch.Tensor
) -> torch.Tensor:
    """Keep-mask over ΔW's rows (kept where u > p, as HF PEFT; u from the engine's generator), optionally divided
    by its mean."""
    keep = (layer.random((rows,), like.device) > p).to(like.dtype)
    mean = keep.mean()
    # an all-dropped mask contributes nothing (HF PEFT would divide 0 by 0)
    return keep / mean if renormalise and bool(mean > 0) else keep


@dataclass(frozen=True)
class WeightDeltaOps(FoldedMerge):
    """:class:`peftdecl.backend.AdditiveOps` of a kind whose whole effect is ΔW = build(lp, p) (IR layout):
    Δ(x) = f(x; m ⊙ ΔW), f the base layer's operation."""

    kind: str
    build: Callable[[LayerPlan, Params], torch.Tensor]
    renormalises_rank_dropout: Callable[[LayerPlan], bool]
    additive: bool = True
    half_compute: bool = True  # a half-precision linear base adds x ΔWᵀ in its own dtype (see forward)

    def _training_delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor | None:
        """m ⊙ ΔW for this call, None when module dropout skips the adapter (training mode only)."""
        skip_p, rank_p = lp.options["module_dropout"], lp.options["rank_dropout"]
        if layer.training and skip_p > 0 and float(layer.random((), torch.device("cpu"))) <= skip_p:
            return None
        delta = self.build(lp, p)
        if layer.training and rank_p > 0:
            keep = rank_keep(layer, delta.shape[0], rank_p, self.renormalises_rank_dropout(lp), delta)
            delta = delta * keep.reshape(-1, *(1,) * (delta.ndim - 1))
        return delta

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        """f(x; W + m ⊙ ΔW) + b: the base weight and ΔW through one operation."""
        delta = self._training_delta(lp, layer, p)
        if delta is None:
            return layer.base_forward(x)
        if x.dtype != delta.dtype or layer.quantized:
            # float32 ΔW on a half-precision base (the layer routes only linear layers here): ΔW rounded to the
            # base dtype and applied as its own product keeps a small ΔW that W + ΔW in half precision would
            # round away, and runs at half-precision speed instead of as a float32 product of every input;
            # a quantised base runs its own kernel and ΔW beside it (no dequantised weight)
            return layer.base_forward(x) + layer.functional(x, delta.to(x.dtype), None)
        return layer.functional(x, layer.weight_ir() + delta, layer.bias)

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        delta = self._training_delta(lp, layer, p)
        if delta is None:  # skipped by module dropout: a zero contribution of the right shape
            return layer.functional(x, torch.zeros_like(self.build(lp, p)), None)
        return layer.functional(x, delta, None)

    def accumulate(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor
    ) -> torch.Tensor:
        """result + Δ(x); nothing is computed when module dropout skips the adapter."""
        delta = self._training_delta(lp, layer, p)
        return result if delta is None else result + layer.functional(x, delta, None)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        return self.build(lp, p)
