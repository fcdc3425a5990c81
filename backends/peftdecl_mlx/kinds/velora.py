"""VeLoRA on MLX: LoRA's forward; in training, u = h Aᵀ runs as a custom function whose gradient for A is taken
from the compressed input (one number per feature group, c_k = h_k · v, rebuilt as scale · c_k v), as the NumPy
reference states it (:mod:`peftdecl_numpy.kinds.velora`); dL/dh and dL/dB are exact."""

from __future__ import annotations

import weakref
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.velora import EMBED
from peftdecl_mlx.kinds._additive import Params
from peftdecl_mlx.kinds.lora import LoraOps

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


def sub_tokens(h: mx.array, num_groups: int) -> mx.array:
    """h [..., in] as [T, G, ⌈in / G⌉], the last group zero-padded."""
    width = h.shape[-1]
    g = -(-width // num_groups)
    flat = h.reshape(-1, width)
    padded = mx.pad(flat, [(0, 0), (0, num_groups * g - width)])
    return padded.reshape(-1, num_groups, g)


@lru_cache(maxsize=64)
def shrink(num_groups: int, scale: float) -> Any:
    """f(h, A, v) -> h Aᵀ whose vjp gives dA = duᵀ · scale · (c ⊗ v)[:, :in], c = groups(h) · v."""

    @mx.custom_function
    def f(h: mx.array, a: mx.array, v: mx.array) -> mx.array:
        return h @ a.T

    @f.vjp
    def f_vjp(primals: list[mx.array], cotangent: mx.array, output: mx.array) -> tuple:
        h, a, v = primals
        du = cotangent.reshape(-1, cotangent.shape[-1])
        compressed = sub_tokens(h, num_groups) @ v
        rebuilt = (compressed[:, :, None] * v[None, None, :]).reshape(compressed.shape[0], -1)
        da = du.T @ (scale * rebuilt[:, : h.shape[-1]])
        return (cotangent @ a), da.astype(a.dtype), mx.zeros_like(v)

    return f


def unit(v: mx.array) -> mx.array:
    """v / ‖v‖ (the all-ones direction for v = 0), without reading a value back (it runs under transforms)."""
    norm = mx.linalg.norm(v)
    ones = mx.ones_like(v) / (v.shape[0] ** 0.5)
    return mx.where(norm > 0, v / mx.where(norm > 0, norm, 1.0), ones)


class VeloraOps(LoraOps):
    kind = "velora"

    def __init__(self) -> None:
        self._seen: weakref.WeakValueDictionary[int, mx.array] = weakref.WeakValueDictionary()

    def alone(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array | None:
        return None if layer.training else super().alone(lp, layer, p, x)

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        if not layer.training:
            return super().delta(lp, layer, p, x)
        h = layer.dropout(x, lp.options["dropout"])
        embed = self.projection(lp, layer, p[EMBED], h)
        u: mx.array = shrink(lp.options["num_groups"], lp.options["velora_scale"])(
            h, p["lora_A.weight"], embed
        )
        v = (lp.scaling * u) @ p["lora_B.weight"].T
        return v + lp.scaling * p["lora_B.bias"] if "lora_B.bias" in p else v

    def projection(self, lp: LayerPlan, layer: AdaptedLayer, embed: mx.array, h: mx.array) -> mx.array:
        """v for this step: set from the batch's mean sub-token where the init type asks for it (and stored)."""
        init = lp.options["init_type"]
        if init == "random" or (init == "batch_average_once" and self._seen.get(id(embed)) is embed):
            return embed
        grouped = sub_tokens(mx.stop_gradient(h), lp.options["num_groups"])
        new = unit(grouped.reshape(-1, grouped.shape[-1]).astype(mx.float32).mean(axis=0)).astype(embed.dtype)
        layer.overwrite(lp, EMBED, new)
        self._seen[id(new)] = new
        return new


OPS = VeloraOps()
