"""DoRA (Liu et al., 2024): y = g ⊙ (W x + s·B A x) + b with g = m / n and n = ‖W + s·B A‖_row held constant.

n is detached (paper §4.3, as HF PEFT): A and B get no gradient through it. In training with dropout, HF PEFT
recomputes the base term on the dropped input h = dropout(x): y = W x + b + (g − 1) ⊙ W h + g ⊙ s·B A h, which
is the eval formula when h = x. Embeddings: y = g ⊙ (E[x] + s·Aᵀ[x] Bᵀ) with n over the vocabulary axis;
convolutions normalise over every axis but the output channel. n comes from the factored sum
(``dora_weight_norm``), never B A; a grouped conv takes HF PEFT's norm (:func:`grouped_weight_norm`) and cannot
merge.

Zero rows: where n = 0 (W + s·B A has an all-zero row) HF PEFT divides by zero (NaN/inf, issue #2049). Here
g is 1 on such rows and m gets no gradient there: the row behaves as plain LoRA and every output stays finite.
Merge: W' = g ⊙ (W + ΔW) with n cached for unmerge (W = W' / g − ΔW). As in HF PEFT, n is taken on the weight
without the adapters merged before (the one forward reads), while g multiplies the weight as it is, so merging
several DoRA adapters in turn gives W' = g₂ ⊙ (g₁ ⊙ (W + ΔW₁) + ΔW₂), the weight of their composed forward.
With other adapters on the layer DoRA rescales the output they built (:meth:`DoraOps.compose_output`).
"""

from __future__ import annotations

from peftdecl.errors import PeftdeclError
from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.dora import MAGNITUDE
from peftdecl_numpy.conv import conv_backward, conv_forward
from peftdecl_numpy.kinds.base import ComposingKind, MergeCache, Params, Tape, Weights
from peftdecl_numpy.kinds.lora import OPS as LORA
from peftdecl_numpy.kinds.lora import embedding_delta, embedding_grads
from peftdecl_numpy.layers import BaseLayer, dropout_mask, rows
from peftdecl_numpy.xp_ops import Array, einsum, namespace, to_numpy


def weight_norm(lp: LayerPlan, weight: Array, p: Params) -> Array:
    """n = ‖W + s·B A‖ per direction row, from the factored sum ‖W‖² + 2s⟨B, W Aᵀ⟩ + s²⟨B, B A Aᵀ⟩ (never B A).

    Rows: the output channel (convolutions flatten the rest); an embedding's rows are its dimensions (W = Eᵀ)."""
    xp = namespace(weight)
    if lp.layer.is_conv and lp.layer.groups > 1:
        return grouped_weight_norm(lp, weight, p)
    if lp.layer.type == "embedding":
        w, a, b = weight.T, p["lora_embedding_A"], p["lora_embedding_B"]
    else:
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        r = a.shape[0]
        w = xp.reshape(weight, (weight.shape[0], -1))
        a, b = xp.reshape(a, (r, -1)), xp.reshape(b, (b.shape[0], r))
    s = lp.scaling
    squared = (
        einsum("oi,oi->o", w, w)
        + 2.0 * s * einsum("or,or->o", b, w @ a.T)
        + s * s * einsum("or,or->o", b, b @ (a @ a.T))
    )
    # cancellation can round a zero row's sum below 0
    return xp.sqrt(xp.maximum(squared, xp.zeros_like(squared)))


def grouped_weight_norm(lp: LayerPlan, weight: Array, p: Params) -> Array:
    """n = ‖W + s·L‖_row on a grouped conv, L = (B as [−1, r]) · (A as [r, −1]) laid out as W: HF PEFT's norm
    (``peftdecl.plan.kinds.dora.grouped_norm_direction``), formed densely (L is no larger than W)."""
    xp = namespace(weight)
    a, b = p["lora_A.weight"], p["lora_B.weight"]
    r, rows_ = a.shape[0], weight.shape[0]
    direction = xp.reshape(weight, (rows_, -1)) + lp.scaling * xp.reshape(
        xp.reshape(b, (-1, r)) @ xp.reshape(a, (r, -1)), (rows_, -1)
    )
    return xp.sqrt(xp.sum(direction * direction, axis=1))


def magnitude_scale(m: Array, n: Array) -> Array:
    """g = m / n per row, and g = 1 where n = 0 (the documented zero-row rule)."""
    xp = namespace(m, n)
    m = xp.reshape(m, (-1,))
    positive = n > 0
    return xp.where(positive, m / xp.where(positive, n, xp.ones_like(n)), xp.ones_like(m))


def _along_out(lp: LayerPlan, v: Array, ndim: int) -> Array:
    # per-row factors broadcast over the output's channel axis (axis 1 for conv, last otherwise)
    return namespace(v).reshape(v, (1, -1, *(1,) * (ndim - 2))) if lp.layer.is_conv else v


def _sum_to_rows(lp: LayerPlan, t: Array) -> Array:
    xp = namespace(t)
    if lp.layer.is_conv:
        return xp.sum(t, axis=(0, *range(2, t.ndim)))
    return xp.sum(rows(t), axis=0)


def _low_rank(lp: LayerPlan, p: Params, h: Array) -> tuple[Array, Array]:
    """(u, v) = (A h, B u): LoRA's path, A with the base's stride and padding (no dilation, as HF PEFT)."""
    a, b = p["lora_A.weight"], p["lora_B.weight"]
    if not lp.layer.is_conv:
        u = h @ a.T
        return u, u @ b.T
    k = a.ndim - 2
    u = conv_forward(h, a, lp.layer.stride, lp.layer.padding, (1,) * k)
    return u, conv_forward(u, b, (1,) * k, (0,) * k, (1,) * k, lp.layer.groups)


def _low_rank_backward(lp: LayerPlan, p: Params, h: Array, u: Array, dv: Array) -> tuple[Array, Params]:
    a, b = p["lora_A.weight"], p["lora_B.weight"]
    if not lp.layer.is_conv:
        du = dv @ b
        return du @ a, {"lora_B.weight": rows(dv).T @ rows(u), "lora_A.weight": rows(du).T @ rows(h)}
    k = a.ndim - 2
    du, grad_b = conv_backward(u, b, dv, (1,) * k, (0,) * k, (1,) * k, lp.layer.groups)
    dh, grad_a = conv_backward(h, a, du, lp.layer.stride, lp.layer.padding, (1,) * k)
    assert dh is not None
    return dh, {"lora_A.weight": grad_a, "lora_B.weight": grad_b}


class DoraOps(ComposingKind):
    kind = "dora"
    # not additive: HF PEFT refuses DoRA in mixed batches, and g rescales the base output

    composition = staticmethod(compositions.dora)

    def weight_norm(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        """n = ‖W + s·ΔW‖ per row of the current base weight, a constant for the gradients."""
        return weight_norm(lp, layer.weight, p)

    def record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        return self.compose_output_record(lp, layer, p, x, layer.forward(x))

    def backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array | None, Params]:
        dy_in, dx, grads = self.compose_output_backward(lp, layer, p, tape, dy)
        dx_base = layer.input_grad(tape["x"], dy_in)
        return (None if dx_base is None else dx_base + dx), grads

    def compose_output_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array, y: Array
    ) -> tuple[Array, Tape]:
        """y' = b + g ⊙ (y − b) + g ⊙ s·B A x for the layer's output so far y (y = W x + b alone: the DoRA
        formula); embeddings y' = g ⊙ (y + s·B A x); with dropout in training y' = y + (g − 1) ⊙ W h + g ⊙ s·B A h."""
        s, n = lp.scaling, self.weight_norm(lp, layer, p)
        g = magnitude_scale(p[MAGNITUDE], n)
        if lp.layer.type == "embedding":
            v, u = embedding_delta(lp, p, x)
            return g * (y + s * v), {"x": x, "n": n, "g": g, "u": u, "direction": y + s * v}
        mask = dropout_mask(layer, x.shape, lp.options["dropout"])
        h = x if mask is None else x * mask
        u, v = _low_rank(lp, p, h)
        gb = _along_out(lp, g, y.ndim)
        tape = {"x": x, "n": n, "g": g, "h": h, "u": u, "mask": mask}
        if mask is None:
            bias = 0.0 if layer.bias is None else _along_out(lp, layer.bias, y.ndim)
            tape["direction"] = y - bias + s * v
            return bias + gb * tape["direction"], tape
        wh = layer.forward(h, with_bias=False)
        tape["direction"] = wh + s * v
        return y + (gb - 1.0) * wh + gb * s * v, tape

    def compose_output_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array, Array | None, Params]:
        """(dL/dy, dL/dx through the low-rank path, dL/dp) of :meth:`compose_output_record`."""
        xp = layer.xp
        s, n, g, u = lp.scaling, tape["n"], tape["g"], tape["u"]
        # dy/dm = direction / n on rows with n > 0; g is fixed at 1 (no gradient) on zero rows
        dg = _sum_to_rows(lp, dy * tape["direction"])
        positive = n > 0
        grad_m = xp.where(positive, dg / xp.where(positive, n, xp.ones_like(n)), xp.zeros_like(dg))
        grad_m = xp.reshape(grad_m, p[MAGNITUDE].shape)
        gb = _along_out(lp, g, dy.ndim)
        dv = s * gb * dy
        if lp.layer.type == "embedding":
            return gb * dy, None, {**embedding_grads(p, tape["x"], u, dv), MAGNITUDE: grad_m}
        h, mask = tape["h"], tape["mask"]
        dh, grads = _low_rank_backward(lp, p, h, u, dv)
        if mask is None:
            return gb * dy, dh, {**grads, MAGNITUDE: grad_m}
        dh_base = layer.input_grad(h, (gb - 1.0) * dy)
        assert dh_base is not None
        return dy, (dh + dh_base) * mask, {**grads, MAGNITUDE: grad_m}

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        """The change merging makes to the current base weight: g ⊙ (W + ΔW) − W."""
        return self._merged_weight(lp, layer, p)[0] - layer.weight

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        merged, n = self._merged_weight(lp, layer, p)
        # n cannot be recovered from the merged weight (its rows have norm |m|), so keep it for unmerge
        cache["n"] = n
        return merged, layer.bias

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        n = cache.get("n")
        if n is None:
            raise PeftdeclError(f"{lp.module}: DoRA unmerge without a matching merge (no cached weight norm)")
        xp = layer.xp
        g = magnitude_scale(p[MAGNITUDE], n)
        if bool(xp.any(g == 0)):
            zero = [i for i, value in enumerate(to_numpy(g)) if value == 0][:8]
            raise PeftdeclError(
                f"{lp.module}: cannot unmerge DoRA, lora_magnitude_vector is 0 in rows {zero} "
                "(merging erased those rows)"
            )
        return layer.weight / self._rows(lp, g) - LORA.delta_weight(lp, layer, p), layer.bias

    def _merged_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> tuple[Array, Array]:
        # n from the weight without the adapters merged before this one, as forward sees it
        n = weight_norm(lp, layer.unmerged_weight(), p)
        g = magnitude_scale(p[MAGNITUDE], n)
        return self._rows(lp, g) * (layer.weight + LORA.delta_weight(lp, layer, p)), n

    @staticmethod
    def _rows(lp: LayerPlan, g: Array) -> Array:
        # g broadcast over the IR weight: embedding columns ([num, dim]), otherwise the leading output axis
        xp = namespace(g)
        if lp.layer.type == "embedding":
            return xp.reshape(g, (1, -1))
        return xp.reshape(g, (-1, *(1,) * (len(lp.layer.weight_shape) - 1)))


OPS = DoraOps()
