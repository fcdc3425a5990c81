"""Arrow routing on the NumPy reference (HF PEFT's ``arrow_config``), per token x over E stacked LoRA experts:

p_e = the expert's prototype (stored: the top right singular vector of B_e A_e, sign-free), a_e = x·p_e, K = the top_k
experts by |a_e|, c = softmax over K of |a_e| / T (0 outside K), Δ(x) = dropout(Σ_e c_e s_e B_e A_e x). The experts
are frozen; the input gradient runs through both the experts and the coefficients. Not mergeable.
"""

from __future__ import annotations

from typing import NoReturn

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import AdditiveKind, MergeCache, Params, Tape, Weights
from peftdecl_numpy.layers import BaseLayer, dropout_mask
from peftdecl_numpy.xp_ops import Array


def route(lp: LayerPlan, tokens: np.ndarray, protos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c [t, E], a [t, E]): the routing coefficients and the projections a = x·p they come from."""
    a = tokens @ protos.T
    sim = np.abs(a)
    top = np.argsort(-sim, axis=1, kind="stable")[:, : int(lp.options["top_k"])]
    chosen = np.zeros(sim.shape, dtype=bool)
    np.put_along_axis(chosen, top, True, axis=1)
    score = np.where(chosen, sim / float(lp.options["temperature"]), -np.inf)
    score = np.exp(score - score.max(axis=1, keepdims=True))
    return score / score.sum(axis=1, keepdims=True), a


def refuse_merge(lp: LayerPlan) -> NoReturn:
    raise PeftdeclError(f"{lp.module}: an Arrow router cannot be merged: each token mixes its own experts")


class ArrowOps(AdditiveKind):
    kind = "arrow"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        a_stack, b_stack = np.asarray(p["arrow_experts_A"]), np.asarray(p["arrow_experts_B"])
        scales = np.asarray(p["arrow_experts_scaling"])
        tokens = np.asarray(x).reshape(-1, x.shape[-1])
        protos = np.asarray(p["arrow_prototypes"])
        c, a = route(lp, tokens, protos)
        y = (
            np.einsum("ter,eor->teo", np.einsum("tf,erf->ter", tokens, a_stack), b_stack)
            * scales[None, :, None]
        )
        delta = np.einsum("te,teo->to", c, y)
        mask = dropout_mask(layer, delta.shape, lp.options["dropout"])
        out = delta if mask is None else delta * mask
        tape = {"tokens": tokens, "protos": protos, "c": c, "a": a, "y": y, "mask": mask, "shape": x.shape}
        return out.reshape(*x.shape[:-1], out.shape[-1]), tape

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        g = np.asarray(d_delta).reshape(-1, d_delta.shape[-1])
        if tape["mask"] is not None:
            g = g * tape["mask"]
        a_stack, b_stack = np.asarray(p["arrow_experts_A"]), np.asarray(p["arrow_experts_B"])
        scales, c = np.asarray(p["arrow_experts_scaling"]), tape["c"]
        # through the experts: Σ_e c_e s_e A_eᵀ B_eᵀ g
        g_b = np.einsum("to,eor->ter", g, b_stack)
        dx = np.einsum("te,ter,erf->tf", c * scales[None, :], g_b, a_stack)
        # through the coefficients: dc_e = c_e (h_e − Σ c h), h_e = g·y_e, and |a_e| / T with a_e = x·p_e
        h = np.einsum("to,teo->te", g, tape["y"])
        d_score = c * (h - np.sum(c * h, axis=1, keepdims=True))
        d_a = d_score * np.sign(tape["a"]) / float(lp.options["temperature"])
        dx = dx + d_a @ tape["protos"]
        return dx.reshape(tape["shape"]), {}

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        refuse_merge(lp)

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        refuse_merge(lp)

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        refuse_merge(lp)


OPS = ArrowOps()
