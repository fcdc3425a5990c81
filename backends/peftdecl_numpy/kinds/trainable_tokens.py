"""Trainable tokens on the NumPy reference: the chosen rows t of the weight are replaced by the trained rows d.

Additively, with D = Sᵀ (d − W[t]) (S the one-hot [n, rows] selector of the tokens, so D is zero but on rows t):
an embedding gives y = E[x] + D[x], a linear layer (a tied output head) y = W x + b + D x. Merging writes the rows,
W' = W ⊙ (1 − m) + Sᵀ d (m marks rows t), and keeps the old rows for the unmerge, as HF PEFT does.
"""

from __future__ import annotations

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import AdditiveKind, MergeCache, Params, Tape, Weights
from peftdecl_numpy.layers import BaseLayer, rows
from peftdecl_numpy.xp_ops import Array, add_at_rows, namespace, take_rows

ROWS = "token_rows"  # the merge cache's copy of the rows a merge overwrote


def token_index(lp: LayerPlan, like: Array) -> Array:
    """The chosen token ids as an integer array of ``like``'s namespace."""
    xp = namespace(like)
    return xp.asarray(lp.options["token_indices"], dtype=xp.int64)


def selector(lp: LayerPlan, weight: Array) -> Array:
    """S: the one-hot [n_tokens, rows] matrix of the chosen tokens, in the weight's dtype."""
    xp = namespace(weight)
    index = xp.reshape(token_index(lp, weight), (-1, 1))
    return xp.astype(index == xp.reshape(xp.arange(weight.shape[0], dtype=xp.int64), (1, -1)), weight.dtype)


def row_delta(lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
    """D = Sᵀ (d − W[t]): the change of the full weight, zero outside the chosen rows."""
    xp = layer.xp
    old = xp.take(layer.weight, token_index(lp, layer.weight), axis=0)
    return xp.matrix_transpose(selector(lp, layer.weight)) @ (p[lp.options["tensor"]] - old)


def with_rows(lp: LayerPlan, weight: Array, new_rows: Array) -> Array:
    """W with rows t replaced by ``new_rows`` exactly: W ⊙ (1 − m) + Sᵀ rows."""
    xp = namespace(weight)
    s = selector(lp, weight)
    kept = 1.0 - xp.reshape(xp.sum(s, axis=0), (-1, 1))
    return weight * kept + xp.matrix_transpose(s) @ new_rows


class TrainableTokensOps(AdditiveKind):
    kind = "trainable_tokens"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        d = row_delta(lp, layer, p)
        if lp.layer.type == "embedding":
            return take_rows(d, x), {"x": x, "d": d}
        return x @ namespace(d).matrix_transpose(d), {"x": x, "d": d}

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        x, d = tape["x"], tape["d"]
        xp = namespace(d)
        index = token_index(lp, d)
        name = lp.options["tensor"]
        if lp.layer.type == "embedding":
            full = add_at_rows(xp.zeros_like(d), x, d_delta)  # dL/dD: each looked-up row gets its gradient
            return None, {name: xp.take(full, index, axis=0)}
        picked = xp.take(rows(d_delta), index, axis=1)  # dL/dD[t] = dΔ[:, t]ᵀ x
        return d_delta @ d, {name: xp.matrix_transpose(picked) @ rows(x)}

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        return row_delta(lp, layer, p)

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        cache[ROWS] = layer.xp.take(layer.weight, token_index(lp, layer.weight), axis=0)
        return with_rows(lp, layer.weight, p[lp.options["tensor"]]), layer.bias

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        if ROWS not in cache:
            raise PeftdeclError(f"{lp.module}: the rows this merge overwrote were not kept; cannot unmerge")
        return with_rows(lp, layer.weight, cache.pop(ROWS)), layer.bias


OPS = TrainableTokensOps()
