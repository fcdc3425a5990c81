"""LoRA (Hu et al., 2021) on MLX: Δy = s · B A dropout(x) (+ s · b_B with ``lora_bias``), ΔW = s · B A.

Embedding: Δy = s · (Aᵀ[x]) Bᵀ and ΔE = s · (B A)ᵀ; HF PEFT applies no dropout there.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds import _fused

Params = dict[str, mx.array]


class LoraOps:
    kind = "lora"
    additive = True

    def delta(self, lp: LayerPlan, layer: Any, p: Params, x: mx.array) -> mx.array:
        s = lp.scaling
        if lp.layer.type == "embedding":
            return s * (p["lora_embedding_A"].T[x] @ p["lora_embedding_B"].T)
        h = layer.dropout(x, lp.options["dropout"])
        # s scales the r-wide intermediate, the cheapest place (forward and backward)
        v = (s * (h @ p["lora_A.weight"].T)) @ p["lora_B.weight"].T
        return v + s * p["lora_B.bias"] if "lora_B.bias" in p else v

    def alone(self, lp: LayerPlan, layer: Any, node: Any, x: mx.array) -> mx.array | None:
        """The whole output when this adapter runs alone: y = base(x) + s·(x Aᵀ) Bᵀ, or x (W + s·B A)ᵀ + b where
        forming the merged weight costs less (``_fused.merge_pays``), each one function with its own gradient;
        None where the general path must run (embeddings, dropout active, a base or input dtype other than the
        adapter's). ``node`` is the adapter's parameter tree, read directly."""
        if lp.layer.type != "linear" or (layer.training and lp.options["dropout"] > 0.0):
            return None
        a, b = node["lora_A"]["weight"], node["lora_B"]["weight"]
        w = layer.weight
        if not x.dtype == a.dtype == w.dtype:
            return None
        s = lp.scaling
        if _fused.merge_pays(x, w, a.shape[0], layer.training):
            base_bias = layer.bias
            fused = _fused.lora_merged(s, base_bias is not None)
            y = fused(x, w, w if base_bias is None else base_bias, a, b)
        else:
            y = _fused.lora(s)(layer.base_layer(x), x, a, b)[0]
        bias = node["lora_B"].get("bias")
        return y if bias is None else y + s * bias

    def delta_weight(self, lp: LayerPlan, layer: Any, p: Params) -> mx.array:
        s = lp.scaling
        if lp.layer.type == "embedding":
            return s * (p["lora_embedding_B"] @ p["lora_embedding_A"]).T
        return s * (p["lora_B.weight"] @ p["lora_A.weight"])

    def merge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return layer.weight + self.delta_weight(lp, layer, p), self._bias(lp, layer, p, 1.0)

    def unmerge(
        self, lp: LayerPlan, layer: Any, p: Params, cache: dict[str, Any]
    ) -> tuple[mx.array, mx.array | None]:
        return layer.weight - self.delta_weight(lp, layer, p), self._bias(lp, layer, p, -1.0)

    @staticmethod
    def _bias(lp: LayerPlan, layer: Any, p: Params, sign: float) -> mx.array | None:
        if "lora_B.bias" not in p:
            return layer.bias
        if layer.bias is None:
            raise PeftdeclError(
                f"{lp.module}: cannot merge lora_bias into a layer without a bias (as in HF PEFT)"
            )
        return layer.bias + sign * lp.scaling * p["lora_B.bias"]


OPS = LoraOps()
