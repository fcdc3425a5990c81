"""Trainable tokens on MLX: the chosen rows t of the weight are replaced by the trained rows d.

Δ(x) is the base operation on D = Sᵀ (d − W[t]) (S the one-hot [n, rows] selector, so D is zero but on rows t):
an embedding adds D[x], a linear layer (a tied output head) D x. Merging writes the rows exactly,
W' = W ⊙ (1 − m) + Sᵀ d, and keeps the old rows for the unmerge, as HF PEFT does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import AdditiveKind
from peftdecl_mlx.kinds._protocols import MergeCache, Params

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer

ROWS = "token_rows"  # the merge cache's copy of the rows a merge overwrote


def _index(lp: LayerPlan) -> mx.array:
    return mx.array(list(lp.options["token_indices"]), dtype=mx.int32)


def _selector(lp: LayerPlan, rows: int, dtype: mx.Dtype) -> mx.array:
    """S: one-hot [n_tokens, rows] (a product, so gradients reach d through it)."""
    return (_index(lp)[:, None] == mx.arange(rows)[None, :]).astype(dtype)


def _with_rows(lp: LayerPlan, weight: mx.array, new_rows: mx.array) -> mx.array:
    s = _selector(lp, weight.shape[0], weight.dtype)
    kept = 1.0 - mx.sum(s, axis=0)[:, None]
    return weight * kept + s.T @ new_rows.astype(weight.dtype)


class TrainableTokensOps(AdditiveKind):
    kind = "trainable_tokens"

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """D[x] for an embedding, x Dᵀ for a linear layer."""
        d = self.delta_weight(lp, layer, p)
        if lp.layer.type == "embedding":
            return d[x]
        return x @ d.T

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """D = Sᵀ (d − W[t])."""
        new_rows = p[lp.options["tensor"]]
        weight = layer.weight
        old = weight[_index(lp)].astype(new_rows.dtype)
        return _selector(lp, weight.shape[0], new_rows.dtype).T @ (new_rows - old)

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        weight = layer.weight
        cache[ROWS] = weight[_index(lp)]
        return _with_rows(lp, weight, p[lp.options["tensor"]]), layer.bias

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        if ROWS not in cache:
            raise PeftdeclError(f"{lp.module}: the rows this merge overwrote were not kept; cannot unmerge")
        return _with_rows(lp, layer.weight, cache.pop(ROWS)), layer.bias


OPS = TrainableTokensOps()


def tied_head_tokens(layer: AdaptedLayer, x: mx.array, y: mx.array) -> mx.array:
    """The output of a head tied to embedding ``layer`` (``y = x Wᵀ`` from its base weight) plus x Dᵀ of each running
    trainable-tokens adapter on it: the head reads the trained rows, as HF PEFT ties them."""
    state = layer.adapter_state
    for name in state.running:
        lp = state.plans[name]
        if lp.kind == OPS.kind:
            d = OPS.delta_weight(lp, layer, layer.params(name))
            y = y + (x.astype(d.dtype) @ d.T).astype(y.dtype)
    return y
