"""BD-LoRA on MLX: the blocked factor (its n diagonal blocks stacked along the rows) expanded to the dense
block-diagonal matrix, then LoRA's math; MLX's autograd returns the gradient of the blocks only."""

from __future__ import annotations

import mlx.core as mx

from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import Params
from peftdecl_mlx.kinds._substituted import SubstitutedLora

_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight"}


def block_diagonal(stacked: mx.array, n: int) -> mx.array:
    """The dense block-diagonal matrix whose i-th diagonal block is the i-th of n row-chunks of ``stacked``."""
    rows, cols = stacked.shape[0] // n, stacked.shape[1]
    band = []
    for i in range(n):
        block = stacked[i * rows : (i + 1) * rows]
        left = mx.zeros((rows, i * cols), dtype=stacked.dtype)
        right = mx.zeros((rows, (n - 1 - i) * cols), dtype=stacked.dtype)
        band.append(mx.concatenate([left, block, right], axis=1))
    return mx.concatenate(band, axis=0)


class BdLoraOps(SubstitutedLora):
    kind = "bdlora"

    def substitute(self, lp: LayerPlan, p: Params) -> Params:
        blocked = lp.options["blocked"]
        if not blocked:
            return p
        name = _NAMES[blocked]
        return {**p, name: block_diagonal(p[name], lp.options["nblocks"])}


OPS = BdLoraOps()
