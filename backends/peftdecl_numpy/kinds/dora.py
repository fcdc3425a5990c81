"""DoRA (Liu et al., 2024): y = g ⊙ (W x + s·B A x) + b with g = m / n and n = ‖W + s·B A‖_row held constant.

n is detached (paper §4.3, as HF PEFT): A and B get no gradient through it. In training with dropout, HF PEFT
recomputes the base term on the dropped input h = dropout(x): y = W x + b + (g − 1) ⊙ W h + g ⊙ s·B A h, which
is the eval formula when h = x. Embeddings: y = g ⊙ (E[x] + s·Aᵀ[x] Bᵀ) with n over the vocabulary axis;
convolutions normalise over every axis but the output channel. n comes from the factored sum
(``dora_weight_norm``), never B A.

Zero rows: where n = 0 (W + s·B A has an all-zero row) HF PEFT divides by zero (NaN/inf, issue #2049). Here
g is 1 on such rows and m gets no gradient there: the row behaves as plain LoRA and every output stays finite.
Merge: W' = g ⊙ (W + ΔW) with n cached for unmerge (W = W' / g − ΔW). As in HF PEFT, n is taken on the weight
without the adapters merged before (the one forward reads), while g multiplies the weight as it is, so merging
several DoRA adapters in turn gives W' = g₂ ⊙ (g₁ ⊙ (W + ΔW₁) + ΔW₂), the weight of their composed forward.
With other adapters on the layer DoRA rescales the output they built (:meth:`DoraOps.output_map`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl.composition import OUTPUT
from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.dora import MAGNITUDE, dora_weight_norm
from peftdecl_numpy.conv import conv_backward, conv_forward
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.kinds.lora import OPS as LORA
from peftdecl_numpy.layers import BaseLayer, dropout_mask

Params = dict[str, np.ndarray]
LAYER_TYPES = ("linear", "embedding", "conv1d", "conv2d", "gpt2_conv1d")


def magnitude_scale(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """g = m / n per row, and g = 1 where n = 0 (the documented zero-row rule)."""
    m = m.reshape(-1)
    return np.divide(m, n, out=np.ones_like(m), where=n > 0)


def _along_out(lp: LayerPlan, v: np.ndarray, ndim: int) -> np.ndarray:
    # per-row factors broadcast over the output's channel axis (axis 1 for conv, last otherwise)
    return v.reshape(1, -1, *(1,) * (ndim - 2)) if lp.layer.is_conv else v


def _sum_to_rows(lp: LayerPlan, t: np.ndarray) -> np.ndarray:
    if lp.layer.is_conv:
        return t.sum(axis=(0, *range(2, t.ndim)))
    return t.reshape(-1, t.shape[-1]).sum(axis=0)


def _low_rank(lp: LayerPlan, p: Params, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) = (A h, B u): LoRA's path, A with the base's stride and padding (no dilation, as HF PEFT)."""
    a, b = p["lora_A.weight"], p["lora_B.weight"]
    if not lp.layer.is_conv:
        u = h @ a.T
        return u, u @ b.T
    k = a.ndim - 2
    u = conv_forward(h, a, lp.layer.stride, lp.layer.padding, (1,) * k)
    return u, conv_forward(u, b, (1,) * k, (0,) * k, (1,) * k)


def _low_rank_backward(
    lp: LayerPlan, p: Params, h: np.ndarray, u: np.ndarray, dv: np.ndarray
) -> tuple[np.ndarray, Params]:
    a, b = p["lora_A.weight"], p["lora_B.weight"]
    if not lp.layer.is_conv:
        du = dv @ b
        grads = {
            "lora_B.weight": dv.reshape(-1, dv.shape[-1]).T @ u.reshape(-1, u.shape[-1]),
            "lora_A.weight": du.reshape(-1, du.shape[-1]).T @ h.reshape(-1, h.shape[-1]),
        }
        return du @ a, grads
    k = a.ndim - 2
    du, grad_b = conv_backward(u, b, dv, (1,) * k, (0,) * k, (1,) * k)
    dh, grad_a = conv_backward(h, a, du, lp.layer.stride, lp.layer.padding, (1,) * k)
    assert dh is not None
    return dh, {"lora_A.weight": grad_a, "lora_B.weight": grad_b}


class DoraOps:
    kind = "dora"
    # not additive: HF PEFT refuses DoRA in mixed batches, and g rescales the base output
    additive = False

    def composition(self, lp: LayerPlan) -> str:
        """With other adapters on the layer, g rescales the output they built (HF PEFT's DoRA takes the running
        result as its base result)."""
        return OUTPUT

    def weight_norm(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        """n = ‖W + s·ΔW‖ per row of the current base weight, a constant for the gradients."""
        return dora_weight_norm(lp, base.weight, p)

    def forward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        return self.output_map(lp, base, p, x, base.forward(x), ctx)

    def backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray | None, Params]:
        dy_in, dx, grads = self.output_map_backward(lp, base, p, cache, dy)
        dx_base = base.input_grad(cache["x"], dy_in)
        return (None if dx_base is None else dx_base + dx), grads

    def output_map(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, y: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """y' = b + g ⊙ (y − b) + g ⊙ s·B A x for the layer's output so far y (y = W x + b alone: the DoRA
        formula); embeddings y' = g ⊙ (y + s·B A x); with dropout in training y' = y + (g − 1) ⊙ W h + g ⊙ s·B A h."""
        s, n = lp.scaling, self.weight_norm(lp, base, p)
        g = magnitude_scale(p[MAGNITUDE], n)
        if lp.layer.type == "embedding":
            u = p["lora_embedding_A"].T[x]
            v = u @ p["lora_embedding_B"].T
            return g * (y + s * v), {"x": x, "n": n, "g": g, "u": u, "direction": y + s * v}
        mask = dropout_mask(ctx.rng, x.shape, lp.options["dropout"]) if ctx.training else None
        h = x if mask is None else x * mask
        u, v = _low_rank(lp, p, h)
        gb = _along_out(lp, g, y.ndim)
        cache = {"x": x, "n": n, "g": g, "h": h, "u": u, "mask": mask}
        if mask is None:
            bias = 0.0 if base.bias is None else _along_out(lp, base.bias, y.ndim)
            cache["direction"] = y - bias + s * v
            return bias + gb * cache["direction"], cache
        wh = base.forward(h, with_bias=False)
        cache["direction"] = wh + s * v
        return y + (gb - 1.0) * wh + gb * s * v, cache

    def output_map_backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, Params]:
        """(dL/dy, dL/dx through the low-rank path, dL/dp) of :meth:`output_map`."""
        s, n, g, u = lp.scaling, cache["n"], cache["g"], cache["u"]
        # dy/dm = direction / n on rows with n > 0; g is fixed at 1 (no gradient) on zero rows
        dg = _sum_to_rows(lp, dy * cache["direction"])
        grad_m = np.divide(dg, n, out=np.zeros_like(dg), where=n > 0).reshape(p[MAGNITUDE].shape)
        gb = _along_out(lp, g, dy.ndim)
        dv = s * gb * dy
        if lp.layer.type == "embedding":
            b, x = p["lora_embedding_B"], cache["x"]
            du = dv @ b
            grad_a_t = np.zeros_like(p["lora_embedding_A"].T)
            np.add.at(grad_a_t, x.reshape(-1), du.reshape(-1, du.shape[-1]))
            grad_b = dv.reshape(-1, dv.shape[-1]).T @ u.reshape(-1, u.shape[-1])
            grads = {"lora_embedding_A": grad_a_t.T, "lora_embedding_B": grad_b, MAGNITUDE: grad_m}
            return gb * dy, None, grads
        h, mask = cache["h"], cache["mask"]
        dh, grads = _low_rank_backward(lp, p, h, u, dv)
        if mask is None:
            return gb * dy, dh, {**grads, MAGNITUDE: grad_m}
        dh_base = base.input_grad(h, (gb - 1.0) * dy)
        assert dh_base is not None
        return dy, (dh + dh_base) * mask, {**grads, MAGNITUDE: grad_m}

    def delta_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        """The change merging makes to the current base weight: g ⊙ (W + ΔW) − W."""
        return self._merged_weight(lp, base, p)[0] - base.weight

    def merge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        merged, n = self._merged_weight(lp, base, p)
        # n cannot be recovered from the merged weight (its rows have norm |m|), so keep it for unmerge
        base.merge_state[id(lp)] = n
        return merged, base.bias

    def unmerge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        n = base.merge_state.pop(id(lp), None)
        if n is None:
            raise PeftdeclError(f"{lp.module}: DoRA unmerge without a matching merge (no cached weight norm)")
        g = magnitude_scale(p[MAGNITUDE], n)
        if np.any(g == 0):
            rows = np.flatnonzero(g == 0)[:8].tolist()
            raise PeftdeclError(
                f"{lp.module}: cannot unmerge DoRA, lora_magnitude_vector is 0 in rows {rows} "
                "(merging erased those rows)"
            )
        return base.weight / self._rows(lp, g) - LORA.delta_weight(lp, base, p), base.bias

    def _merged_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray]:
        # n from the weight without the adapters merged before this one, as forward sees it
        n = dora_weight_norm(lp, base.unmerged_weight(), p)
        g = magnitude_scale(p[MAGNITUDE], n)
        return self._rows(lp, g) * (base.weight + LORA.delta_weight(lp, base, p)), n

    @staticmethod
    def _rows(lp: LayerPlan, g: np.ndarray) -> np.ndarray:
        # g broadcast over the IR weight: embedding columns ([num, dim]), otherwise the leading output axis
        if lp.layer.type == "embedding":
            return g[None, :]
        return g.reshape(-1, *(1,) * (len(lp.layer.weight_shape) - 1))


OPS = DoraOps()
