"""When a kind may run a linear layer through its hand-written autograd Function instead of composed torch ops.

The Functions assume a frozen base weight, one dtype throughout, no autocast and no dropout on the adapter input
(dropout masks would have to be kept for the backward pass); anything else takes the composed path, which
autograd differentiates as usual. ``ENABLED = False`` forces the composed path (the tests run both).
"""

from __future__ import annotations

from typing import Any

import torch

from peftdecl.plan import LayerPlan

ENABLED = True


def fusable(lp: LayerPlan, layer: Any, x: torch.Tensor, dtype: torch.dtype, dropout: float = 0.0) -> bool:
    """True if ``layer`` (linear or GPT-2 Conv1D) can run this call through a fused Function."""
    if not ENABLED or lp.layer.type not in ("linear", "gpt2_conv1d") or (layer.training and dropout > 0):
        return False
    weight, bias = layer.base_layer.weight, layer.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False  # the hand-written backward gives no gradient to the base weights
    return not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype == dtype


def weight_ir(weight: torch.Tensor, stored_in_out: bool) -> torch.Tensor:
    """The weight as [out, in] (a view: GPT-2 Conv1D stores [in, out])."""
    return weight.t() if stored_in_out else weight


def linear(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 wᵀ + b for 2-D x2 and w [out, in]."""
    return torch.addmm(bias, x2, w.t()) if bias is not None else torch.mm(x2, w.t())


def merge_pays(lp: LayerPlan, x: torch.Tensor) -> bool:
    """Whether folding a low-rank update into the weight (out·in work) is cheaper than applying it to every
    token (tokens·(in + out) each): true beyond in·out / (in + out) tokens."""
    d_in, d_out = lp.layer.in_features, lp.layer.out_features
    tokens = x.numel() // max(x.shape[-1], 1)
    return tokens * (d_in + d_out) >= d_in * d_out
