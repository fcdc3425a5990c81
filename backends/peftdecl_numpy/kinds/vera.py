"""VeRA (Kopiczko et al., 2024): y = W x + b + λ_b ⊙ B (λ_d ⊙ A dropout(x)), ΔW = diag(λ_b) B diag(λ_d) A.

A and B are the shared frozen projections cut to the layer: A[:r, :in] and B[:out, :r]. There is no scaling.
"""

from __future__ import annotations

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import AdditiveKind, Params, Tape
from peftdecl_numpy.layers import BaseLayer, dropout_mask, rows
from peftdecl_numpy.xp_ops import Array


def _projections(lp: LayerPlan, p: Params) -> tuple[Array, Array]:
    return p["vera_A"][: lp.r, : lp.layer.in_features], p["vera_B"][: lp.layer.out_features, : lp.r]


class VeraOps(AdditiveKind):
    kind = "vera"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        a, b = _projections(lp, p)
        mask = dropout_mask(layer, x.shape, lp.options["dropout"])
        h = x if mask is None else x * mask
        u = h @ a.T  # A x
        v = (p["vera_lambda_d"] * u) @ b.T  # B (λ_d ⊙ A x)
        return p["vera_lambda_b"] * v, {"u": u, "v": v, "mask": mask}

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        xp = layer.xp
        a, b = _projections(lp, p)
        lam_d, lam_b, u, v = p["vera_lambda_d"], p["vera_lambda_b"], tape["u"], tape["v"]
        dv = d_delta * lam_b
        dw = dv @ b  # gradient at λ_d ⊙ A x
        grads = {
            "vera_lambda_b": xp.sum(rows(d_delta * v), axis=0),
            "vera_lambda_d": xp.sum(rows(dw * u), axis=0),
        }
        dh = (dw * lam_d) @ a
        mask = tape["mask"]
        return (dh if mask is None else dh * mask), grads

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        a, b = _projections(lp, p)
        xp = layer.xp
        return (xp.reshape(p["vera_lambda_b"], (-1, 1)) * b) @ (xp.reshape(p["vera_lambda_d"], (-1, 1)) * a)


OPS = VeraOps()
