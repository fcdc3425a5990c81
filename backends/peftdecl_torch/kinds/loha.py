"""LoHa (Hyeon-Woo et al., FedPara 2022) on torch: ΔW = s · (w1a w1b) ⊙ (w2a w2b), s = alpha / r.

With ``use_effective_conv2d`` each Hadamard factor is the CP rebuild Pᵢ[o, c, k, l] = Σ tᵢ[i, j, k, l] wᵢa[i, o]
wᵢb[j, c]. The layer runs as f(x; W + ΔW) with ΔW built once per call.
"""

from __future__ import annotations

import torch

from peftdecl.plan import LayerPlan
from peftdecl_torch import cuda_kernels
from peftdecl_torch.kinds._weight_delta import Params, WeightDeltaOps, rebuild_cp


def hadamard_factor(lp: LayerPlan, p: Params, i: int) -> torch.Tensor:
    """Pᵢ = wᵢa · wᵢb, or the CP rebuild from tᵢ."""
    a, b = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
    return rebuild_cp(p[f"hada_t{i}"], a, b) if lp.options["effective_conv"] else a @ b


@cuda_kernels.replaces("loha_delta")
def delta_weight(lp: LayerPlan, p: Params) -> torch.Tensor:
    return (lp.scaling * (hadamard_factor(lp, p, 1) * hadamard_factor(lp, p, 2))).reshape(
        lp.layer.weight_shape
    )


# HF PEFT always divides LoHa's rank-dropout mask by its mean
OPS = WeightDeltaOps("loha", delta_weight, renormalises_rank_dropout=lambda lp: True)
