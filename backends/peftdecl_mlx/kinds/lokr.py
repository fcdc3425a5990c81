"""LoKr (LyCORIS) on MLX: ΔW = s · kron(w1, w2), s = alpha / r even when both factors are full matrices.

w1 is ``lokr_w1`` or w1_a w1_b; w2 is ``lokr_w2`` or w2_a w2_b.
"""

from __future__ import annotations

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._weight_delta import Params, WeightDeltaOps


def delta_weight(lp: LayerPlan, p: Params) -> mx.array:
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    return lp.scaling * mx.kron(w1, w2)


# HF PEFT divides LoKr's rank-dropout mask by its mean only with rank_dropout_scale
OPS = WeightDeltaOps(
    "lokr", delta_weight, renormalises_rank_dropout=lambda lp: bool(lp.options["rank_dropout_scale"])
)
