"""LoRA (Hu et al., 2021): y = W x + b + s · B A dropout(x), ΔW = s · B A.

Embedding: y = E[x] + s · (Aᵀ[x]) Bᵀ, ΔE = s · (B A)ᵀ. Convolution: A is a k×k convolution to r channels and B a
1×1 convolution with the base's groups, so ΔW[o, i, k] = s · Σ_r B[o, r] A[r, i, k] (grouped: no ΔW in the
grouped layout, so no merge). With ``lora_bias`` B carries a bias, scaled by s.
"""

from __future__ import annotations

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.lora import refuse_grouped_merge
from peftdecl_numpy.conv import conv_backward, conv_forward
from peftdecl_numpy.kinds.base import AdditiveKind, MergeCache, Params, Tape, Weights
from peftdecl_numpy.layers import BaseLayer, dropout_mask, rows
from peftdecl_numpy.xp_ops import Array, add_at_rows, einsum, namespace, take_rows


def _conv_a(lp: LayerPlan, h: Array, a: Array) -> Array:
    # HF PEFT builds lora_A with the base's kernel, stride and padding, but no dilation
    return conv_forward(h, a, lp.layer.stride, lp.layer.padding, _ones(a.ndim - 2))


def _ones(n: int) -> tuple[int, ...]:
    return (1,) * n


def embedding_delta(lp: LayerPlan, p: Params, x: Array) -> tuple[Array, Array]:
    """(Aᵀ[x] Bᵀ, Aᵀ[x]): the unscaled low-rank term of an embedding, and its rank-r activations."""
    u = take_rows(p["lora_embedding_A"].T, x)
    return u @ p["lora_embedding_B"].T, u


def embedding_grads(p: Params, x: Array, u: Array, dv: Array) -> Params:
    """dL/dA and dL/dB of v = Aᵀ[x] Bᵀ given dL/dv (the rows of Aᵀ picked by x get the gradient)."""
    a_t = p["lora_embedding_A"].T
    grad_a_t = add_at_rows(namespace(a_t).zeros_like(a_t), x, dv @ p["lora_embedding_B"])
    return {"lora_embedding_A": grad_a_t.T, "lora_embedding_B": rows(dv).T @ rows(u)}


class LoraOps(AdditiveKind):
    kind = "lora"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        s, xp = lp.scaling, layer.xp
        if lp.layer.type == "embedding":
            v, u = embedding_delta(lp, p, x)
            return s * v, {"x": x, "u": u}
        mask = dropout_mask(layer, x.shape, lp.options["dropout"])
        h = x if mask is None else x * mask
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            k = b.ndim - 2
            u = _conv_a(lp, h, a)
            v = conv_forward(u, b, _ones(k), (0,) * k, _ones(k), lp.layer.groups)
            if "lora_B.bias" in p:
                v = v + xp.reshape(p["lora_B.bias"], (1, -1, *_ones(v.ndim - 2)))
        else:
            u = h @ a.T
            v = u @ b.T
            if "lora_B.bias" in p:
                v = v + p["lora_B.bias"]
        return s * v, {"x": x, "h": h, "u": u, "mask": mask}

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        u = tape["u"]
        dv = lp.scaling * d_delta
        if lp.layer.type == "embedding":
            return None, embedding_grads(p, tape["x"], u, dv)
        a, b, h, mask = p["lora_A.weight"], p["lora_B.weight"], tape["h"], tape["mask"]
        grads: dict[str, Array] = {}
        if lp.layer.is_conv:
            k = b.ndim - 2
            du, grads["lora_B.weight"] = conv_backward(
                u, b, dv, _ones(k), (0,) * k, _ones(k), lp.layer.groups
            )
            dh, grads["lora_A.weight"] = conv_backward(h, a, du, lp.layer.stride, lp.layer.padding, _ones(k))
        else:
            grads["lora_B.weight"] = rows(dv).T @ rows(u)
            du = dv @ b
            grads["lora_A.weight"] = rows(du).T @ rows(h)
            dh = du @ a
        if "lora_B.bias" in p:
            grads["lora_B.bias"] = layer.bias_shape_sum(dv)
        assert dh is not None
        return (dh if mask is None else dh * mask), grads

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        s = lp.scaling
        if lp.layer.type == "embedding":
            return s * (p["lora_embedding_B"] @ p["lora_embedding_A"]).T
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            refuse_grouped_merge(lp)
            b2 = namespace(b).reshape(b, (b.shape[0], b.shape[1]))
            return s * einsum("or,ri...->oi...", b2, a)
        return s * (b @ a)

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        return layer.weight + self.delta_weight(lp, layer, p), merged_bias(lp, layer.bias, p, +1.0)

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        return layer.weight - self.delta_weight(lp, layer, p), merged_bias(lp, layer.bias, p, -1.0)


def merged_bias(lp: LayerPlan, bias: Array | None, p: Params, sign: float) -> Array | None:
    """b ± s · b_B with ``lora_bias`` (b unchanged without it), on any array type with ``+`` and ``*``: the MLX
    backend merges with it too."""
    if "lora_B.bias" not in p:
        return bias
    if bias is None:
        raise PeftdeclError(
            f"{lp.module}: cannot merge lora_bias into a layer without a bias (as in HF PEFT)"
        )
    return bias + sign * lp.scaling * p["lora_B.bias"]


OPS = LoraOps()
