"""The float64 reference of LoRA on a raw parameter (``target_parameters``): ΔW, the merged parameter and the
gradients of A and B, for a parameter ``[out, in]`` or an expert stack ``[E, out, in]`` (``[E, in, out]``
transposed). Per expert e: ΔW_e = s · B_e A_e, A_e = A[e·r : e·r + r], B_e = B[:, e::E]
(:mod:`peftdecl.plan.kinds.lora_param`).

A raw parameter has no operation of its own (the module holding it decides how it is used), so the reference
computes what the adapter does to the parameter; the torch backend runs the module with W + ΔW in its place.
"""

from __future__ import annotations

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import Params
from peftdecl_numpy.xp_ops import Array, einsum, namespace, swap_last


def _factors(lp: LayerPlan, p: Params) -> tuple[Array, Array]:
    """(A as [E, r, in], B as [out, r, E])."""
    a, b = p["lora_A.weight"], p["lora_B.weight"]
    num = int(lp.options.get("experts", 1))
    xp = namespace(a)
    return xp.reshape(a, (num, -1, a.shape[-1])), xp.reshape(b, (b.shape[0], -1, num))


def _per_expert(lp: LayerPlan, weight_like: Array) -> Array:
    """A parameter-shaped array as [E, out, in] (a view)."""
    xp = namespace(weight_like)
    if weight_like.ndim == 2:
        return xp.reshape(weight_like, (1, *weight_like.shape))
    return swap_last(weight_like) if lp.layer.transposed else weight_like


def delta_weight(lp: LayerPlan, p: Params) -> Array:
    """ΔW in the parameter's own shape."""
    a3, b3 = _factors(lp, p)
    delta = lp.scaling * einsum("ore,eri->eoi", b3, a3)
    if len(lp.layer.shape) == 2:
        return delta[0]
    return swap_last(delta) if lp.layer.transposed else delta


def merged(lp: LayerPlan, weight: Array, p: Params) -> Array:
    """The parameter with the adapter folded in: W + ΔW."""
    return weight + delta_weight(lp, p)


def unmerged(lp: LayerPlan, weight: Array, p: Params) -> Array:
    """The parameter with the adapter taken out again: W − ΔW."""
    return weight - delta_weight(lp, p)


def factor_grads(lp: LayerPlan, p: Params, d_weight: Array) -> Params:
    """dL/dA and dL/dB given dL/dW' for the parameter W' = W + ΔW the module used:
    dA_e = s · B_eᵀ G_e, dB_e = s · G_e A_eᵀ with G_e expert e's gradient as [out, in]."""
    a3, b3 = _factors(lp, p)
    g = _per_expert(lp, d_weight)
    xp = namespace(g)
    grad_a = lp.scaling * einsum("ore,eoi->eri", b3, g)
    grad_b = lp.scaling * einsum("eoi,eri->ore", g, a3)
    return {
        "lora_A.weight": xp.reshape(grad_a, p["lora_A.weight"].shape),
        "lora_B.weight": xp.reshape(grad_b, p["lora_B.weight"].shape),
    }
