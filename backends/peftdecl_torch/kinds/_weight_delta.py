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
from typing import Any

import torch

from peftdecl.plan import LayerPlan

Params = dict[str, torch.Tensor]


def rebuild_cp(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CP rebuild of a conv kernel: P[o, c, k, l] = Σ_ij t[i, j, k, l] · a[i, o] · b[j, c]."""
    return torch.einsum("ijkl,io,jc->ockl", t, a, b)


def rank_keep(rows: int, p: float, renormalise: bool, like: torch.Tensor) -> torch.Tensor:
    """Keep-mask over ΔW's rows (kept where u > p, as HF PEFT), optionally divided by its mean."""
    keep = (torch.rand(rows, device=like.device) > p).to(like.dtype)
    mean = keep.mean()
    # an all-dropped mask contributes nothing (HF PEFT would divide 0 by 0)
    return keep / mean if renormalise and bool(mean > 0) else keep


@dataclass(frozen=True)
class WeightDeltaOps:
    """Forward and merging for a kind whose whole effect is an additive ΔW = delta(lp, p) (IR layout)."""

    kind: str
    delta: Callable[[LayerPlan, Params], torch.Tensor]
    renormalises_rank_dropout: Callable[[LayerPlan], bool]
    additive: bool = True
    half_compute: bool = True  # a half-precision linear base adds x ΔWᵀ in its own dtype (see forward)

    def forward(self, lp: LayerPlan, layer: Any, p: Params, x: torch.Tensor, result: Any) -> torch.Tensor:
        skip_p, rank_p = lp.options["module_dropout"], lp.options["rank_dropout"]
        if layer.training and skip_p > 0 and float(torch.rand(())) <= skip_p:
            return layer.base_forward(x) if result is None else result
        delta = self.delta(lp, p)
        if layer.training and rank_p > 0:
            keep = rank_keep(delta.shape[0], rank_p, self.renormalises_rank_dropout(lp), delta)
            delta = delta * keep.reshape(-1, *(1,) * (delta.ndim - 1))
        if result is None:
            if x.dtype != delta.dtype:
                # float32 ΔW on a half-precision base (the layer routes only linear layers here): ΔW rounded to the
                # base dtype and applied as its own product keeps a small ΔW that W + ΔW in half precision would
                # round away, and runs at half-precision speed instead of as a float32 product of every input
                return layer.base_forward(x) + layer.functional(x, delta.to(x.dtype), None)
            return layer.functional(x, layer.weight_ir() + delta, layer.bias)
        return result + layer.functional(x, delta, None)

    def delta_weight(self, lp: LayerPlan, layer: Any, p: Params) -> torch.Tensor:
        return self.delta(lp, p)

    def merge(self, lp: LayerPlan, layer: Any, p: Params, cache: dict) -> tuple[torch.Tensor, Any]:
        weight = layer.weight_ir()
        return weight + self.delta(lp, p).to(weight.dtype), None

    def unmerge(self, lp: LayerPlan, layer: Any, p: Params, cache: dict) -> tuple[torch.Tensor, Any]:
        weight = layer.weight_ir()
        return weight - self.delta(lp, p).to(weight.dtype), None
