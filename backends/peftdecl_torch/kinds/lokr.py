"""LoKr (LyCORIS) on torch: ΔW = s · kron(w1, w2), s = alpha / r even when both factors are full matrices.

w1 is ``lokr_w1`` or w1_a w1_b; w2 is ``lokr_w2``, w2_a w2_b, or the CP rebuild of ``lokr_t2``. w1 is lifted to
``[l, m, 1, 1]`` only when w2 is 4-d (as HF PEFT); the product is reshaped to the base weight. The layer runs as
f(x; W + ΔW) with ΔW built once per call.
"""

from __future__ import annotations

import torch

from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds._weight_delta import Params, WeightDeltaOps, rebuild_cp


def factor_w1(p: Params) -> torch.Tensor:
    return p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]


def factor_w2(p: Params) -> torch.Tensor:
    if "lokr_w2" in p:
        return p["lokr_w2"]
    if "lokr_t2" in p:
        return rebuild_cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    return p["lokr_w2_a"] @ p["lokr_w2_b"]


def delta_weight(lp: LayerPlan, p: Params) -> torch.Tensor:
    w1, w2 = factor_w1(p), factor_w2(p)
    lifted = w1[:, :, None, None] if w2.ndim == 4 else w1
    return (lp.scaling * torch.kron(lifted, w2)).reshape(lp.layer.weight_shape)


# HF PEFT divides LoKr's rank-dropout mask by its mean only with rank_dropout_scale
OPS = WeightDeltaOps(
    "lokr", delta_weight, renormalises_rank_dropout=lambda lp: bool(lp.options["rank_dropout_scale"])
)
