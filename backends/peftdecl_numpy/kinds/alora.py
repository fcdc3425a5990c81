"""Activated LoRA on the NumPy reference: y = W x + b + m ⊙ s · B A dropout(x), m_t = 1 from the row's invocation
tokens on (peftdecl.alora), 0 before them and wherever the call set no offsets. Not mergeable."""

from __future__ import annotations

from typing import NoReturn

import numpy as np

from peftdecl.alora import token_mask
from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import MergeCache, Params, Tape, Weights
from peftdecl_numpy.kinds.lora import LoraOps
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array


def position_mask(lp: LayerPlan, x: Array) -> np.ndarray:
    """m broadcastable against the layer's output: [B, T, 1] for a [B, T, in] input, [B, 1] for [B, in]."""
    batch, length = x.shape[0], (x.shape[1] if x.ndim == 3 else 1)
    mask = token_mask(tuple(lp.options["invocation_tokens"]), batch, length, lp.module)
    return mask[..., None] if x.ndim == 3 else mask


def refuse_merge(lp: LayerPlan) -> NoReturn:
    raise PeftdeclError(
        f"{lp.module}: an aLoRA adapter cannot be merged: it acts only from the invocation tokens on (as in HF PEFT)"
    )


class AloraOps(LoraOps):
    kind = "alora"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        delta, tape = super().delta_record(lp, layer, p, x)
        mask = layer.xp.asarray(position_mask(lp, x), dtype=delta.dtype)
        return delta * mask, {**tape, "alora_mask": mask}

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        return super().delta_backward(lp, layer, p, tape, d_delta * tape["alora_mask"])

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        refuse_merge(lp)

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        refuse_merge(lp)


OPS = AloraOps()
