"""LoHa (Hyeon-Woo et al., FedPara 2022) on MLX: ΔW = s · (w1a w1b) ⊙ (w2a w2b), s = alpha / r."""

from __future__ import annotations

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._weight_delta import Params, WeightDeltaOps


def delta_weight(lp: LayerPlan, p: Params) -> mx.array:
    p1 = p["hada_w1_a"] @ p["hada_w1_b"]
    p2 = p["hada_w2_a"] @ p["hada_w2_b"]
    return lp.scaling * (p1 * p2)


# HF PEFT always divides LoHa's rank-dropout mask by its mean
OPS = WeightDeltaOps("loha", delta_weight, renormalises_rank_dropout=lambda lp: True)
