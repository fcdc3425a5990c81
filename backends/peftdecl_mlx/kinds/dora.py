"""DoRA (Liu et al., 2024) on MLX: y = g ⊙ (W x + s·B A x) + b, g = m / n, n = ‖W + s·B A‖_row held constant.

For large layers n comes from the factored sum ‖W‖² + 2s·Σ B ⊙ (W Aᵀ) + s²·Σ B ⊙ (B A Aᵀ), never forming
B A (‖W‖² cached for the frozen base); small ones form W + s·B A. n is reused while W, A and B are unchanged.
Training with dropout h = dropout(x): y = W x + b + (g − 1) ⊙ W h + g ⊙ s·B A h (HF PEFT).
Embeddings: y = g ⊙ (E[x] + s·Aᵀ[x] Bᵀ), n over the vocabulary. Rows with n = 0 keep g = 1 (the reference's rule).
With other adapters on the layer g rescales the output they built; merging takes n on the weight without the
adapters merged before, as HF PEFT does. Over a quantised base n is taken on W dequantised for the purpose (a
temporary, as HF PEFT does over bitsandbytes); the product is x W′ᵀ where W′ was formed for n just now, else the
layer's own quantised product plus the low-rank term (n reused in inference, large layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import mlx.core as mx

from peftdecl.errors import PeftdeclError
from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.dora import MAGNITUDE
from peftdecl_mlx.kinds import _fused
from peftdecl_mlx.kinds._protocols import MergeCache, Params
from peftdecl_mlx.kinds.lora import OPS as LORA

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


def _low_rank(lp: LayerPlan, p: Params) -> tuple[mx.array, mx.array]:
    """(A, B) as 2-D row views: an embedding's directions are its dimensions, so A spans the vocabulary."""
    if lp.layer.type == "embedding":
        return p["lora_embedding_A"], p["lora_embedding_B"]
    return p["lora_A.weight"], p["lora_B.weight"]


FORM_LIMIT = 1 << 22
"""Layers with at most this many weights form s·B A for the norm (a temporary of the weight's size, and one
GEMM of a shape MLX's CPU build runs well); larger ones use the factored sum, which never forms it."""


def weight_norm(lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
    """n = ‖W + s·B A‖ per direction row, with no gradient (paper §4.3)."""
    return _norm_and_merged(lp, layer, p)[0]


def _norm_and_merged(lp: LayerPlan, layer: AdaptedLayer, p: Params) -> tuple[mx.array, mx.array | None]:
    """(n, W′ = W + s·B A held constant) where W′ is formed (a linear layer up to FORM_LIMIT), else (n, None)."""
    s = lp.scaling
    a, b = _low_rank(lp, p)
    w = layer.weight
    if w.dtype != a.dtype:
        w = w.astype(a.dtype)
    embedding = lp.layer.type == "embedding"
    rows = w.T if embedding else w
    if rows.size <= FORM_LIMIT:
        merged = mx.stop_gradient(mx.addmm(rows, b, a, alpha=s))
        return mx.stop_gradient(mx.linalg.norm(merged, axis=1)), None if embedding else merged
    # A as a row-contiguous [in, r] copy: products with a long inner dimension read their right operand in order
    a_t = mx.contiguous(a.T)
    if embedding:
        wa = (a @ w).T
    elif layer.quantized:
        # (A Wᵀ)ᵀ from the codes: the dequantised W above stays an unevaluated graph node, never formed
        wa = layer.base_forward(a, with_bias=False).T.astype(a.dtype)
    else:
        wa = w @ a_t
    squared = (
        layer.row_norms_squared()
        + (2.0 * s) * mx.sum(b * wa, axis=1)
        + (s * s) * mx.sum(b * (b @ (a @ a_t)), axis=1)
    )
    return mx.stop_gradient(mx.sqrt(mx.maximum(squared, 0.0))), None


def magnitude_scale(m: mx.array, n: mx.array) -> mx.array:
    """g = m / n per row, and g = 1 (no gradient to m) where n = 0."""
    inverse, ones = _inverse(n)
    return m * inverse + ones


def _inverse(n: mx.array) -> tuple[mx.array, mx.array]:
    # (1/n where n > 0 else 0, 1 where n = 0): g = m · (1/n) + [n = 0] keeps zero rows at 1, with no 0 · ∞ in
    # the gradient, and leaves two operations on m per call
    positive = n > 0
    return mx.where(positive, 1.0 / mx.where(positive, n, 1.0), 0.0), mx.where(positive, 0.0, 1.0)


class DoraOps:
    kind = "dora"
    # g rescales the base output, so DoRA is neither summed with other adapters nor used in mixed batches
    additive = False
    # unused: DoRA composes on the output side only
    input_order: Literal["active", "reversed"] = "active"

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """y = g ⊙ (W x + s·B A x) + b (an embedding's: g ⊙ (E[x] + s·Aᵀ[x] Bᵀ))."""
        s = lp.scaling
        a, b = _low_rank(lp, p)
        formed: list[mx.array | None] = []

        def norm() -> tuple[mx.array, mx.array]:
            n, merged = _norm_and_merged(lp, layer, p)
            formed.append(merged)
            return _inverse(n)

        # n depends on W, A and B only: reuse it while they are the same arrays (inference, repeated calls); a
        # quantised W is dequantised for n only, its output is the layer's own product
        inverse, ones = layer.memo(lp, (layer.weight_identity, a, b), norm)
        m = p[MAGNITUDE]
        m = m if m.ndim == 1 else m.reshape(-1)
        if lp.layer.type == "embedding":
            direction = layer.base_forward(x) + s * (p["lora_embedding_A"].T[x] @ p["lora_embedding_B"].T)
            return (m * inverse + ones) * direction
        dropout = layer.training and lp.options["dropout"] > 0.0
        merged = formed[0] if formed else None
        # over a quantised base only where W′ was just formed for the norm (training): otherwise its own product
        dense = not layer.quantized or merged is not None
        if layer.options.fused and not dropout and dense and x.dtype == a.dtype == layer.dtype:
            w = layer.weight
            # W′ formed for the norm just now serves the product too (x W′ᵀ instead of x Wᵀ + s·(x Aᵀ) Bᵀ); with
            # n reused, W′ is formed again only where the engine options or the cost rule choose it
            if merged is None and _fused.use_merged(layer.options, x, w, a.shape[0], layer.training):
                merged = mx.stop_gradient(mx.addmm(w, b, a, alpha=s))
            fused = _fused.dora(s, merged is not None)
            y = fused(x, w, w if merged is None else merged, a, b, m, inverse, ones)[0]
            bias = layer.bias
            return y if bias is None else y + bias
        g = m * inverse + ones
        xa = x if x.dtype == a.dtype else x.astype(a.dtype)
        h = layer.dropout(xa, lp.options["dropout"])
        v = (s * (h @ a.T)) @ b.T
        if h is xa:
            y = g * (layer.base_forward(xa, with_bias=False) + v)
            return y if layer.bias is None else y + layer.bias
        return layer.base_forward(x) + (g - 1.0) * layer.base_forward(h, with_bias=False) + g * v

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """g ⊙ (W + s·B A) − W, the merged weight less the current one (n on the unmerged weight)."""
        return self.merge(lp, layer, p, {})[0] - layer.weight

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(g ⊙ (W + s·B A), b) with n taken on the weight without earlier merges."""
        # n on the weight without the adapters merged before (the one forward reads), as in HF PEFT
        n = _direct_norm(lp, layer.unmerged_weight(), p)
        # n cannot be recovered from the merged weight (its rows have norm |m|), so keep it for unmerge
        cache["norm"] = n
        g = _merge_scale(p[MAGNITUDE].reshape(-1), n)
        return self._rows(lp, g) * (layer.weight + LORA.delta_weight(lp, layer, p)), layer.bias

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(W / g − s·B A, b) with the n kept by the merge."""
        if "norm" not in cache:
            raise PeftdeclError(f"{lp.module}: DoRA unmerge without a matching merge (no cached weight norm)")
        g = _merge_scale(p[MAGNITUDE].reshape(-1), cache["norm"])
        if bool(mx.any(g == 0).item()):
            raise PeftdeclError(
                f"{lp.module}: cannot unmerge DoRA, lora_magnitude_vector is 0 in some rows; merging erased them"
            )
        return layer.weight / self._rows(lp, g) - LORA.delta_weight(lp, layer, p), layer.bias

    composition = staticmethod(compositions.dora)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array, y: mx.array
    ) -> mx.array:
        """b + g ⊙ (y − b) + g ⊙ s·B A x for the output so far y; embeddings g ⊙ (y + s·B A x); with dropout in
        training y + (g − 1) ⊙ W h + g ⊙ s·B A h."""
        s = lp.scaling
        g = magnitude_scale(p[MAGNITUDE].reshape(-1), weight_norm(lp, layer, p))
        if lp.layer.type == "embedding":
            return g * (y + s * (p["lora_embedding_A"].T[x] @ p["lora_embedding_B"].T))
        h = layer.dropout(x, lp.options["dropout"])
        v = (s * (h @ p["lora_A.weight"].T)) @ p["lora_B.weight"].T
        if h is not x:
            return y + (g - 1.0) * layer.base_forward(h, with_bias=False) + g * v
        bias = layer.bias
        return g * (y + v) if bias is None else bias + g * (y - bias + v)

    def compose_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: mx.array) -> mx.array:
        """Not a map of the input: DoRA composes on the output (:meth:`composition`)."""
        raise PeftdeclError(f"{lp.module}: DoRA rescales the output; it has no input-side weight map")

    @staticmethod
    def _rows(lp: LayerPlan, g: mx.array) -> mx.array:
        # embeddings are stored [num_embeddings, dim] and g runs over dim; linear weights are [out, in]
        return g[None, :] if lp.layer.type == "embedding" else g[:, None]


def _direct_norm(lp: LayerPlan, weight: mx.array, p: Params) -> mx.array:
    """n = ‖W + s·B A‖ per direction row of ``weight``, formed densely (merging only)."""
    a, b = _low_rank(lp, p)
    rows = weight.T if lp.layer.type == "embedding" else weight
    # (s·B) A: the order mlx-lm's fuse rounds in, so that a merge re-quantises to its very codes
    return mx.stop_gradient(mx.linalg.norm(rows.astype(a.dtype) + (lp.scaling * b) @ a, axis=1))


def _merge_scale(m: mx.array, n: mx.array) -> mx.array:
    """g = m / n per row (1 where n = 0), divided as mlx-lm's fuse divides (the forward's m · (1/n) rounds apart)."""
    positive = n > 0
    return mx.where(positive, m / mx.where(positive, n, 1.0), 1.0)


OPS = DoraOps()
