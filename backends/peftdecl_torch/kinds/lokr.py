"""LoKr (LyCORIS) on torch: ΔW = s · kron(w1, w2), s = alpha / r even when both factors are full matrices.

w1 is ``lokr_w1`` or w1_a w1_b; w2 is ``lokr_w2``, w2_a w2_b, or the CP rebuild of ``lokr_t2``. w1 is lifted to
``[l, m, 1, 1]`` only when w2 is 4-d (as HF PEFT); the product is reshaped to the base weight. The layer runs as
f(x; W + ΔW) with ΔW built once per call.
"""

from __future__ import annotations

import torch

from peftdecl.plan import LayerPlan
from peftdecl_torch import cuda_kernels
from peftdecl_torch.kinds._weight_delta import Params, WeightDeltaOps, rebuild_cp


def factor_w1(p: Params) -> torch.Tensor:
    return p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]


def factor_w2(p: Params) -> torch.Tensor:
    if "lokr_w2" in p:
        return p["lokr_w2"]
    if "lokr_t2" in p:
        return rebuild_cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    return p["lokr_w2_a"] @ p["lokr_w2_b"]


@cuda_kernels.replaces("lokr_delta")
def delta_weight(lp: LayerPlan, p: Params) -> torch.Tensor:
    w1, w2 = factor_w1(p), factor_w2(p)
    lifted = w1[:, :, None, None] if w2.ndim == 4 else w1
    return (lp.scaling * kron(lifted, w2)).reshape(lp.layer.weight_shape)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """kron(a, b): out[i·B + j] = a[i] b[j] on every axis, the tensor with fewer axes taking leading size-1 ones.

    torch.kron views its inputs and fails on a size-1 axis with an odd stride (the CP rebuild of a conv1d factor
    has one), so convolution factors are multiplied by broadcasting; matrices keep torch.kron, which is faster."""
    if a.ndim == b.ndim == 2:
        return torch.kron(a, b)
    ndim = max(a.ndim, b.ndim)
    a = a.reshape((1,) * (ndim - a.ndim) + tuple(a.shape))
    b = b.reshape((1,) * (ndim - b.ndim) + tuple(b.shape))
    a_shape = [d for n in a.shape for d in (n, 1)]
    b_shape = [d for n in b.shape for d in (1, n)]
    product = a.reshape(a_shape) * b.reshape(b_shape)
    return product.reshape([m * n for m, n in zip(a.shape, b.shape, strict=True)])


# HF PEFT divides LoKr's rank-dropout mask by its mean only with rank_dropout_scale
OPS = WeightDeltaOps(
    "lokr", delta_weight, renormalises_rank_dropout=lambda lp: bool(lp.options["rank_dropout_scale"])
)
