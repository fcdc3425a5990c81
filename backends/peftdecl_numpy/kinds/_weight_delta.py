"""Adapters that add a rebuilt weight (LoHa, LoKr): y = f(x; W) + b + f(x; m ⊙ ΔW), ΔW recomputed every call.

``f`` is the base layer's own operation (a matmul, or a convolution with the base's stride, padding, dilation
and groups). Training only: module dropout skips ΔW with probability p; rank dropout multiplies each row
(output feature) of ΔW by a Bernoulli keep-mask m, divided by the mask's mean where the kind asks for it. A
kind supplies ``delta(lp, p) -> (ΔW, tape)`` and ``delta_grads(lp, p, tape, dL/dΔW) -> {name: dL/dp}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.layers import BaseLayer

Params = dict[str, np.ndarray]


def rebuild_cp(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CP rebuild of a conv kernel: P[o, c, k, l] = Σ_ij t[i, j, k, l] · a[i, o] · b[j, c]."""
    return np.einsum("ijkl,io,jc->ockl", t, a, b, optimize=True)


def rebuild_cp_grads(
    t: np.ndarray, a: np.ndarray, b: np.ndarray, dp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dL/dt, dL/da, dL/db) of :func:`rebuild_cp` given dL/dP."""
    dt = np.einsum("ockl,io,jc->ijkl", dp, a, b, optimize=True)
    da = np.einsum("ockl,ijkl,jc->io", dp, t, b, optimize=True)
    db = np.einsum("ockl,ijkl,io->jc", dp, t, a, optimize=True)
    return dt, da, db


def matmul_grads(a: np.ndarray, b: np.ndarray, dp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/da, dL/db) of P = a · b given dL/dP."""
    return dp @ b.T, a.T @ dp


def rank_dropout_mask(rng: np.random.Generator, rows: int, p: float, renormalise: bool) -> np.ndarray:
    """Keep-mask over ΔW's rows, kept where u > p as in HF PEFT, optionally divided by its mean."""
    keep = (rng.random(rows) > p).astype(np.float64)
    mean = keep.mean()
    # HF PEFT divides 0 by 0 when every row is dropped (NaN); here an all-dropped ΔW contributes nothing
    return keep / mean if renormalise and mean > 0 else keep


DeltaFn = Callable[[LayerPlan, Params], tuple[np.ndarray, Any]]
"""ΔW in the base weight's layout (scaling included) and a tape for the gradients."""
DeltaGradsFn = Callable[[LayerPlan, Params, Any, np.ndarray], Params]
"""dL/dp for every tensor of the layer, given the tape and dL/dΔW."""


@dataclass(frozen=True)
class WeightDeltaOps:
    """Forward, gradients and merging for a kind whose whole effect is an additive ΔW."""

    kind: str
    delta: DeltaFn
    delta_grads: DeltaGradsFn
    renormalises_rank_dropout: Callable[[LayerPlan], bool]
    additive: bool = True

    def forward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        y = base.forward(x)
        skip_p, rank_p = lp.options["module_dropout"], lp.options["rank_dropout"]
        # HF PEFT applies the adapter when u > p, so it is skipped with probability p
        if ctx.training and skip_p > 0 and ctx.rng.random() <= skip_p:
            return y, {"x": x, "skipped": True}
        delta, tape = self.delta(lp, p)
        mask = None
        if ctx.training and rank_p > 0:
            keep = rank_dropout_mask(ctx.rng, delta.shape[0], rank_p, self.renormalises_rank_dropout(lp))
            mask = keep.reshape(-1, *(1,) * (delta.ndim - 1))
        w = delta if mask is None else delta * mask
        return y + base.forward(x, weight=w, with_bias=False), {"x": x, "w": w, "mask": mask, "tape": tape}

    def backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray | None, Params]:
        x = cache["x"]
        dx = base.input_grad(x, dy)
        assert dx is not None
        if cache.get("skipped"):
            return dx, {spec.name: np.zeros(spec.shape) for spec in lp.params if spec.role == "trainable"}
        dx_delta = base.input_grad(x, dy, weight=cache["w"])
        assert dx_delta is not None
        g = base.weight_grad(x, dy)  # dL/d(m ⊙ ΔW): the delta path is the base operation with another weight
        if cache["mask"] is not None:
            g = g * cache["mask"]
        return dx + dx_delta, self.delta_grads(lp, p, cache["tape"], g)

    def delta_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        return self.delta(lp, p)[0]

    def merge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        return base.weight + self.delta_weight(lp, base, p), base.bias

    def unmerge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        return base.weight - self.delta_weight(lp, base, p), base.bias
