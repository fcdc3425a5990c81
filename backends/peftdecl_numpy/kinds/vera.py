"""VeRA (Kopiczko et al., 2024): y = W x + b + λ_b ⊙ B (λ_d ⊙ A dropout(x)), ΔW = diag(λ_b) B diag(λ_d) A.

A and B are the shared frozen projections cut to the layer: A[:r, :in] and B[:out, :r]. There is no scaling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.vera import register_projection_source
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.layers import BaseLayer, dropout_mask
from peftdecl_numpy.torch_bridge import vera_projections

Params = dict[str, np.ndarray]
LAYER_TYPES = ("linear", "gpt2_conv1d")

# Files saved with save_projection=False are readable wherever torch can regenerate PEFT's projections.
register_projection_source(vera_projections)


def _projections(lp: LayerPlan, p: Params) -> tuple[np.ndarray, np.ndarray]:
    return p["vera_A"][: lp.r, : lp.layer.in_features], p["vera_B"][: lp.layer.out_features, : lp.r]


class VeraOps:
    kind = "vera"
    additive = True

    def forward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        a, b = _projections(lp, p)
        mask = dropout_mask(ctx.rng, x.shape, lp.options["dropout"]) if ctx.training else None
        h = x if mask is None else x * mask
        u = h @ a.T  # A x
        v = (p["vera_lambda_d"] * u) @ b.T  # B (λ_d ⊙ A x)
        return base.forward(x) + p["vera_lambda_b"] * v, {"x": x, "h": h, "u": u, "v": v, "mask": mask}

    def backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray, Params]:
        a, b = _projections(lp, p)
        lam_d, lam_b, u, v = p["vera_lambda_d"], p["vera_lambda_b"], cache["u"], cache["v"]
        dv = dy * lam_b
        dw = dv @ b  # gradient at λ_d ⊙ A x
        grads = {
            "vera_lambda_b": (dy * v).reshape(-1, v.shape[-1]).sum(axis=0),
            "vera_lambda_d": (dw * u).reshape(-1, u.shape[-1]).sum(axis=0),
        }
        dh = (dw * lam_d) @ a
        mask = cache["mask"]
        dx = base.input_grad(cache["x"], dy)
        assert dx is not None
        return dx + (dh if mask is None else dh * mask), grads

    def delta_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        a, b = _projections(lp, p)
        return (p["vera_lambda_b"][:, None] * b) @ (p["vera_lambda_d"][:, None] * a)

    def merge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        return base.weight + self.delta_weight(lp, base, p), base.bias

    def unmerge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        return base.weight - self.delta_weight(lp, base, p), base.bias


OPS = VeraOps()
