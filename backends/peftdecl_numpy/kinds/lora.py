"""LoRA (Hu et al., 2021): y = W x + b + s · B A dropout(x), ΔW = s · B A.

Embedding: y = E[x] + s · (Aᵀ[x]) Bᵀ, ΔE = s · (B A)ᵀ. Convolution: A is a k×k convolution to r channels and B a
1×1 convolution, so ΔW[o, i, k] = s · Σ_r B[o, r] A[r, i, k]. With ``lora_bias`` B carries a bias, scaled by s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_numpy.conv import conv_backward, conv_forward
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.layers import BaseLayer, dropout_mask

Params = dict[str, np.ndarray]
LAYER_TYPES = ("linear", "embedding", "conv1d", "conv2d", "gpt2_conv1d")


def _conv_a(lp: LayerPlan, h: np.ndarray, a: np.ndarray) -> np.ndarray:
    # HF PEFT builds lora_A with the base's kernel, stride and padding, but no dilation
    return conv_forward(h, a, lp.layer.stride, lp.layer.padding, _ones(a.ndim - 2))


def _ones(n: int) -> tuple[int, ...]:
    return (1,) * n


class LoraOps:
    kind = "lora"
    additive = True

    def forward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        s = lp.scaling
        y = base.forward(x)
        if lp.layer.type == "embedding":
            u = p["lora_embedding_A"].T[x]
            return y + s * (u @ p["lora_embedding_B"].T), {"x": x, "u": u}
        mask = dropout_mask(ctx.rng, x.shape, lp.options["dropout"]) if ctx.training else None
        h = x if mask is None else x * mask
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            k = b.ndim - 2
            u = _conv_a(lp, h, a)
            v = conv_forward(u, b, _ones(k), (0,) * k, _ones(k))
            if "lora_B.bias" in p:
                v = v + p["lora_B.bias"].reshape(1, -1, *_ones(v.ndim - 2))
        else:
            u = h @ a.T
            v = u @ b.T
            if "lora_B.bias" in p:
                v = v + p["lora_B.bias"]
        return y + s * v, {"x": x, "h": h, "u": u, "mask": mask}

    def backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray | None, Params]:
        s, x, u = lp.scaling, cache["x"], cache["u"]
        dv = s * dy
        if lp.layer.type == "embedding":
            b = p["lora_embedding_B"]
            du = dv @ b
            grad_a_t = np.zeros_like(p["lora_embedding_A"].T)
            np.add.at(grad_a_t, x.reshape(-1), du.reshape(-1, du.shape[-1]))
            grad_b = dv.reshape(-1, dv.shape[-1]).T @ u.reshape(-1, u.shape[-1])
            return None, {"lora_embedding_A": grad_a_t.T, "lora_embedding_B": grad_b}
        a, b, h, mask = p["lora_A.weight"], p["lora_B.weight"], cache["h"], cache["mask"]
        grads: Params = {}
        if lp.layer.is_conv:
            k = b.ndim - 2
            du, grads["lora_B.weight"] = conv_backward(u, b, dv, _ones(k), (0,) * k, _ones(k))
            dh, grads["lora_A.weight"] = conv_backward(h, a, du, lp.layer.stride, lp.layer.padding, _ones(k))
        else:
            grads["lora_B.weight"] = dv.reshape(-1, dv.shape[-1]).T @ u.reshape(-1, u.shape[-1])
            du = dv @ b
            grads["lora_A.weight"] = du.reshape(-1, du.shape[-1]).T @ h.reshape(-1, h.shape[-1])
            dh = du @ a
        if "lora_B.bias" in p:
            grads["lora_B.bias"] = base.bias_shape_sum(dv)
        dx = base.input_grad(x, dy)
        assert dx is not None and dh is not None
        return dx + (dh if mask is None else dh * mask), grads

    def delta_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        s = lp.scaling
        if lp.layer.type == "embedding":
            return s * (p["lora_embedding_B"] @ p["lora_embedding_A"]).T
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            return s * np.einsum("or,ri...->oi...", b.reshape(b.shape[0], b.shape[1]), a)
        return s * (b @ a)

    def merge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        return base.weight + self.delta_weight(lp, base, p), self._bias(lp, base, p, +1.0)

    def unmerge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        return base.weight - self.delta_weight(lp, base, p), self._bias(lp, base, p, -1.0)

    @staticmethod
    def _bias(lp: LayerPlan, base: BaseLayer, p: Params, sign: float) -> np.ndarray | None:
        if "lora_B.bias" not in p:
            return base.bias
        if base.bias is None:
            raise PeftdeclError(
                f"{lp.module}: cannot merge lora_bias into a layer without a bias (as in HF PEFT)"
            )
        return base.bias + sign * lp.scaling * p["lora_B.bias"]


OPS = LoraOps()
