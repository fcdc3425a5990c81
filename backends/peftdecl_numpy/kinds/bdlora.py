"""BD-LoRA (Wang et al., 2025) in the NumPy reference: LoRA whose A or B is block-diagonal.

A blocked factor is stored as its n diagonal blocks stacked along the rows ([r, in / n] for A, [out, r / n] for B);
the ops expand it to the dense block-diagonal matrix, run LoRA's math on it and take back the gradient of the
diagonal blocks only (the off-diagonal zeros are not parameters).
"""

from __future__ import annotations

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import Params, Tape
from peftdecl_numpy.kinds.lora import LoraOps
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array, namespace

_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight"}


def block_diagonal(stacked: Array, n: int) -> Array:
    """The dense block-diagonal matrix whose i-th diagonal block is the i-th of n row-chunks of ``stacked``."""
    xp = namespace(stacked)
    rows, cols = stacked.shape[0] // n, stacked.shape[1]
    dense = xp.zeros((stacked.shape[0], cols * n), dtype=stacked.dtype)
    for i in range(n):
        dense[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols] = stacked[i * rows : (i + 1) * rows]
    return dense


def diagonal_blocks(dense: Array, n: int) -> Array:
    """The n diagonal blocks of ``dense`` stacked along the rows (the inverse of :func:`block_diagonal`)."""
    xp = namespace(dense)
    rows, cols = dense.shape[0] // n, dense.shape[1] // n
    return xp.concatenate(
        [dense[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols] for i in range(n)], axis=0
    )


def dense_params(lp: LayerPlan, p: Params) -> Params:
    """The layer's tensors with the blocked factor (if any) as its dense block-diagonal matrix."""
    blocked = lp.options["blocked"]
    if not blocked:
        return p
    name = _NAMES[blocked]
    return {**p, name: block_diagonal(p[name], lp.options["nblocks"])}


class BdLoraOps(LoraOps):
    kind = "bdlora"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        return super().delta_record(lp, layer, dense_params(lp, p), x)

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        dx, grads = super().delta_backward(lp, layer, dense_params(lp, p), tape, d_delta)
        blocked = lp.options["blocked"]
        if not blocked:
            return dx, grads
        name = _NAMES[blocked]
        return dx, {**grads, name: diagonal_blocks(grads[name], lp.options["nblocks"])}

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        return super().delta_weight(lp, layer, dense_params(lp, p))


OPS = BdLoraOps()
