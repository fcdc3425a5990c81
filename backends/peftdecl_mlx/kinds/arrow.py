"""Arrow routing on MLX (HF PEFT's ``arrow_config``), per token x over E stacked LoRA experts, as the NumPy
reference states it: a_e = x·p_e (p_e the stored prototype), K = the top_k experts by |a_e|, c = softmax over K of
|a_e| / T (0 outside K), Δ(x) = dropout(Σ_e c_e s_e B_e A_e x). The experts are frozen; autodiff takes the input
gradient through the experts and the coefficients. Not mergeable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import mlx.core as mx

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import AdditiveKind, MergeCache, Params

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


def coefficients(lp: LayerPlan, tokens: mx.array, protos: mx.array) -> mx.array:
    """c [t, E]: the softmax at temperature T of |x·p_e| over each token's top_k experts, 0 for the others."""
    sim = mx.abs(tokens @ protos.T)
    k = int(lp.options["top_k"])
    # the choice of experts is a constant of the gradient (as the reference's backward treats it)
    top = mx.argpartition(mx.stop_gradient(-sim), kth=k - 1, axis=1)[:, :k]
    chosen = mx.put_along_axis(mx.zeros(sim.shape, dtype=mx.bool_), top, mx.array(True), axis=1)
    score = mx.where(chosen, sim / float(lp.options["temperature"]), mx.array(-mx.inf, dtype=sim.dtype))
    return mx.softmax(score, axis=1)


def refuse_merge(lp: LayerPlan) -> NoReturn:
    raise PeftdeclError(f"{lp.module}: an Arrow router cannot be merged: each token mixes its own experts")


class ArrowOps(AdditiveKind):
    """Δ(x) of the router; its own lora_A/lora_B (kept for HF PEFT's file) take no part."""

    kind = "arrow"

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """Σ_e c_e s_e B_e A_e x per token, then the layer's dropout."""
        a_stack, b_stack, scales = p["arrow_experts_A"], p["arrow_experts_B"], p["arrow_experts_scaling"]
        tokens = x.reshape(-1, x.shape[-1])
        coeff = coefficients(lp, tokens, p["arrow_prototypes"])
        # per expert: u_e = A_e x [t, E, r], then y_e = B_e u_e [t, E, out]
        u = mx.einsum("tf,erf->ter", tokens, a_stack)
        y = mx.einsum("ter,eor->teo", u, b_stack)
        delta = mx.einsum("te,teo->to", coeff * scales[None, :], y)
        delta = layer.dropout(delta, lp.options["dropout"])
        return delta.reshape(*x.shape[:-1], delta.shape[-1])

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        refuse_merge(lp)

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        refuse_merge(lp)

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        refuse_merge(lp)


OPS = ArrowOps()
