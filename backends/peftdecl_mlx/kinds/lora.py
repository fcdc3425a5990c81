"""LoRA (Hu et al., 2021) on MLX: Δy = s · B A dropout(x) (+ s · b_B with ``lora_bias``), ΔW = s · B A.

Embedding: Δy = s · (Aᵀ[x]) Bᵀ and ΔE = s · (B A)ᵀ; HF PEFT applies no dropout there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds import _fused
from peftdecl_mlx.kinds._additive import AdditiveKind, Params
from peftdecl_numpy.kinds.lora import merged_bias

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


class LoraOps(AdditiveKind):
    kind = "lora"

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """Δy = s · B A dropout(x) (+ s · b_B)."""
        s = lp.scaling
        if lp.layer.type == "embedding":
            return s * (p["lora_embedding_A"].T[x] @ p["lora_embedding_B"].T)
        h = layer.dropout(x, lp.options["dropout"])
        # s scales the r-wide intermediate, the cheapest place (forward and backward)
        v = (s * (h @ p["lora_A.weight"].T)) @ p["lora_B.weight"].T
        return v + s * p["lora_B.bias"] if "lora_B.bias" in p else v

    def alone(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array | None:
        """The whole output when this adapter runs alone: y = base(x) + s·(x Aᵀ) Bᵀ, or x (W + s·B A)ᵀ + b where
        forming the merged weight is chosen (:func:`_fused.use_merged`, never over a quantised base), each one
        function with its own gradient; None where the general path must run (the ``fused`` engine option off,
        embeddings, dropout active, a base or input dtype other than the adapter's)."""
        if not layer.options.fused or lp.layer.type != "linear":
            return None
        if layer.training and lp.options["dropout"] > 0.0:
            return None
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if not x.dtype == a.dtype == layer.dtype:
            return None
        s = lp.scaling
        # a quantised base keeps its own product (the merged form would dequantise W on every call)
        w = None if layer.quantized else layer.weight
        if w is not None and _fused.use_merged(layer.options, x, w, a.shape[0], layer.training):
            base_bias = layer.bias
            fused = _fused.lora_merged(s, base_bias is not None)
            y = fused(x, w, w if base_bias is None else base_bias, a, b)
        else:
            y = _fused.lora(s)(layer.base_layer(x), x, a, b)[0]
        bias = p.get("lora_B.bias")
        return y if bias is None else y + s * bias

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """ΔW = s · B A (an embedding's: s · (B A)ᵀ)."""
        s = lp.scaling
        if lp.layer.type == "embedding":
            return s * (p["lora_embedding_B"] @ p["lora_embedding_A"]).T
        # (s·B) A: the order mlx-lm's fuse rounds in, so that a merge re-quantises to its very codes
        return (s * p["lora_B.weight"]) @ p["lora_A.weight"]

    def merged_bias(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, sign: float) -> mx.array | None:
        """b ± s · b_B with ``lora_bias`` (the reference's rule)."""
        return merged_bias(lp, layer.bias, p, sign)


OPS = LoraOps()
