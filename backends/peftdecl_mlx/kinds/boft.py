"""BOFT (Liu et al., 2024) on MLX: y = ((x M) Wᵀ) ⊙ s + b with the butterfly M = B_{N−1} ⋯ B_0,
B_i = P_i · blockdiag(Q_{i,1..D}) · P_iᵀ, Q = Cayley(S) = (I − S)(I + S)⁻¹, S = ½(R − Rᵀ).

x M is applied factor by factor (gather, blockwise rotation, gather back), never as a dense d × d matrix.
Merged: W' = diag(s) W Mᵀ; unmerge uses M⁻¹ = Mᵀ. Training-mode ``boft_dropout`` sets int(p·D) random blocks of
one randomly drawn factor to I (HF PEFT's rule). Several active adapters: y = ((x M_k ⋯ M_1) Wᵀ) ⊙ s_1 ⋯ s_k + b,
HF PEFT's product, which is also their merge in turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import mlx.core as mx
import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.boft import butterfly_perms
from peftdecl_mlx.kinds._protocols import MergeCache, Params
from peftdecl_mlx.rotation import butterfly, cayley

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


def perms(lp: LayerPlan) -> tuple[np.ndarray, ...]:
    o = lp.options
    return butterfly_perms(o["width"], o["block_num"], o["block_size"], o["n_butterfly_factor"])


def orthogonal_blocks(p: Params) -> mx.array:
    """Q of every factor's blocks, [N, D, H, H]."""
    r = p["boft_R"]
    return cayley(0.5 * (r - r.swapaxes(-1, -2)))


def dropped(lp: LayerPlan, layer: AdaptedLayer, q: mx.array) -> mx.array:
    rate = lp.options["dropout"]
    if not layer.training or rate <= 0.0:
        return q
    factors, blocks = q.shape[:2]
    mask = np.zeros((factors, blocks), dtype=bool)
    mask[layer.integers(factors), layer.permutation(blocks)[: int(rate * blocks)]] = True
    return mx.where(mx.array(mask)[..., None, None], mx.eye(q.shape[-1], dtype=q.dtype), q)


def butterfly_matrix(lp: LayerPlan, p: Params) -> mx.array:
    """The dense M (rows of I sent through the butterfly), for merging."""
    return butterfly(mx.eye(lp.options["width"]), orthogonal_blocks(p), perms(lp))


class BoftOps:
    kind = "boft"
    additive = False
    # HF PEFT multiplies the active adapters' butterflies as M_k ⋯ M_1: the last one transforms the input first
    input_order: Literal["active", "reversed"] = "reversed"

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """y = ((x M) Wᵀ) ⊙ s + b."""
        rotated = butterfly(x, dropped(lp, layer, orthogonal_blocks(p)), perms(lp))
        y = layer.base_forward(rotated, with_bias=False) * p["boft_s"].reshape(-1)
        return y if layer.bias is None else y + layer.bias

    composition = staticmethod(compositions.boft)

    def compose_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: mx.array) -> mx.array:
        """diag(s) W Mᵀ (its merge): y = ((x M) Wᵀ) ⊙ s + b."""
        q = dropped(lp, layer, orthogonal_blocks(p))
        m = butterfly(mx.eye(lp.options["width"], dtype=q.dtype), q, perms(lp))
        return p["boft_s"].reshape(-1, 1) * (weight @ m.T)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array, y: mx.array
    ) -> mx.array:
        """Not a map of the output: BOFT composes on the input (:meth:`composition`)."""
        raise PeftdeclError(f"{lp.module}: BOFT rotates the input; it has no output-side map")

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """diag(s) W Mᵀ − W: the merged weight less the current one."""
        return self.merge(lp, layer, p, {})[0] - layer.weight

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(diag(s) W Mᵀ, b)."""
        return p["boft_s"].reshape(-1, 1) * (layer.weight @ butterfly_matrix(lp, p).T), layer.bias

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(diag(1/s) W M, b), as M⁻¹ = Mᵀ."""
        return (layer.weight / p["boft_s"].reshape(-1, 1)) @ butterfly_matrix(lp, p), layer.bias


OPS = BoftOps()
