"""Adapters that add a rebuilt weight (LoHa, LoKr): y = f(x; W) + b + f(x; m ⊙ ΔW), ΔW recomputed every call.

``f`` is the base layer's own operation (a matmul, or a convolution with the base's stride, padding, dilation
and groups). Training only: module dropout skips ΔW with probability p; rank dropout multiplies each row
(output feature) of ΔW by a Bernoulli keep-mask m, divided by the mask's mean where the kind asks for it. A
kind supplies ``rebuild(lp, p) -> (ΔW, tape)`` and ``rebuild_grads(lp, p, tape, dL/dΔW) -> {name: dL/dp}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import AdditiveKind, Params, Tape
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array, einsum


def rebuild_cp(t: Array, a: Array, b: Array) -> Array:
    """CP rebuild of a conv kernel: P[o, c, k, l] = Σ_ij t[i, j, k, l] · a[i, o] · b[j, c]."""
    return einsum("ijkl,io,jc->ockl", t, a, b, optimize=True)


def rebuild_cp_grads(t: Array, a: Array, b: Array, dp: Array) -> tuple[Array, Array, Array]:
    """(dL/dt, dL/da, dL/db) of :func:`rebuild_cp` given dL/dP."""
    dt = einsum("ockl,io,jc->ijkl", dp, a, b, optimize=True)
    da = einsum("ockl,ijkl,jc->io", dp, t, b, optimize=True)
    db = einsum("ockl,ijkl,io->jc", dp, t, a, optimize=True)
    return dt, da, db


def matmul_grads(a: Array, b: Array, dp: Array) -> tuple[Array, Array]:
    """(dL/da, dL/db) of P = a · b given dL/dP."""
    return dp @ b.T, a.T @ dp


def rank_dropout_mask(rng: np.random.Generator, rows: int, p: float, renormalise: bool) -> np.ndarray:
    """Keep-mask over ΔW's rows (on the host), kept where u > p as in HF PEFT, optionally divided by its mean."""
    keep = (rng.random(rows) > p).astype(np.float64)
    mean = keep.mean()
    # HF PEFT divides 0 by 0 when every row is dropped (NaN); here an all-dropped ΔW contributes nothing
    return keep / mean if renormalise and mean > 0 else keep


RebuildTape = TypeVar("RebuildTape")
"""What a kind's rebuild keeps for its gradients (its own choice: the factors, their shapes ...)."""
RebuildFn = Callable[[LayerPlan, Params], tuple[Array, RebuildTape]]
"""ΔW in the base weight's layout (scaling included) and a tape for the gradients."""
RebuildGradsFn = Callable[[LayerPlan, Params, RebuildTape, Array], Params]
"""dL/dp for every tensor of the layer, given the tape and dL/dΔW."""


@dataclass(frozen=True)
class WeightDeltaOps(AdditiveKind, Generic[RebuildTape]):
    """Forward, gradients and merging for a kind whose whole effect is an additive ΔW."""

    kind: str
    rebuild: RebuildFn[RebuildTape]
    rebuild_grads: RebuildGradsFn[RebuildTape]
    renormalises_rank_dropout: Callable[[LayerPlan], bool]

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        skip_p, rank_p = lp.options["module_dropout"], lp.options["rank_dropout"]
        # HF PEFT applies the adapter when u > p, so it is skipped with probability p
        if layer.training and skip_p > 0 and layer.rng.random() <= skip_p:
            return layer.xp.zeros_like(layer.forward(x, with_bias=False)), {"skipped": True}
        delta, tape = self.rebuild(lp, p)
        mask = None
        if layer.training and rank_p > 0:
            keep = rank_dropout_mask(layer.rng, delta.shape[0], rank_p, self.renormalises_rank_dropout(lp))
            mask = layer.host(keep.reshape(-1, *(1,) * (delta.ndim - 1)))
        w = delta if mask is None else delta * mask
        return layer.forward(x, weight=w, with_bias=False), {"x": x, "w": w, "mask": mask, "tape": tape}

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        if tape.get("skipped"):
            xp = layer.xp
            zeros = {s.name: xp.zeros_like(p[s.name]) for s in lp.params if s.role == "trainable"}
            return None, zeros
        x = tape["x"]
        dx = layer.input_grad(x, d_delta, weight=tape["w"])
        g = layer.weight_grad(
            x, d_delta
        )  # dL/d(m ⊙ ΔW): the delta path is the base operation, another weight
        if tape["mask"] is not None:
            g = g * tape["mask"]
        return dx, self.rebuild_grads(lp, p, tape["tape"], g)

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        return self.rebuild(lp, p)[0]
