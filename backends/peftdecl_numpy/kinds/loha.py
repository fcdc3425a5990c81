"""LoHa (Hyeon-Woo et al., FedPara 2022): ΔW = s · (w1a w1b) ⊙ (w2a w2b), s = alpha / r.

Each Hadamard factor is the low-rank product Pᵢ = wᵢa wᵢb over ``[out, in/groups · kernel]``, or, for a conv
with ``use_effective_conv2d``, the CP rebuild Pᵢ[o, c, k, l] = Σ tᵢ[i, j, k, l] wᵢa[i, o] wᵢb[j, c].
"""

from __future__ import annotations

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds._weight_delta import (
    Params,
    WeightDeltaOps,
    matmul_grads,
    rebuild_cp,
    rebuild_cp_grads,
)
from peftdecl_numpy.xp_ops import Array, namespace


def hadamard_factor(lp: LayerPlan, p: Params, i: int) -> Array:
    """Pᵢ = wᵢa · wᵢb, or the CP rebuild from tᵢ."""
    a, b = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
    return rebuild_cp(p[f"hada_t{i}"], a, b) if lp.options["effective_conv"] else a @ b


def rebuild(lp: LayerPlan, p: Params) -> tuple[Array, tuple[Array, Array]]:
    p1, p2 = hadamard_factor(lp, p, 1), hadamard_factor(lp, p, 2)
    return namespace(p1).reshape(lp.scaling * (p1 * p2), lp.layer.weight_shape), (p1, p2)


def rebuild_grads(lp: LayerPlan, p: Params, tape: tuple[Array, Array], g: Array) -> Params:
    p1, p2 = tape
    g = lp.scaling * namespace(g).reshape(g, p1.shape)
    grads: dict[str, Array] = {}
    for i, dp in ((1, g * p2), (2, g * p1)):
        a, b = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
        if lp.options["effective_conv"]:
            grads[f"hada_t{i}"], grads[f"hada_w{i}_a"], grads[f"hada_w{i}_b"] = rebuild_cp_grads(
                p[f"hada_t{i}"], a, b, dp
            )
        else:
            grads[f"hada_w{i}_a"], grads[f"hada_w{i}_b"] = matmul_grads(a, b, dp)
    return grads


# HF PEFT always divides LoHa's rank-dropout mask by its mean
OPS = WeightDeltaOps("loha", rebuild, rebuild_grads, renormalises_rank_dropout=lambda lp: True)
