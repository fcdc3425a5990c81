"""AdaLoRA (Zhang et al., 2023): y = W x + b + s · P (Q ⊙ Λ) dropout(x), s = α / (init_r + 1e-5).

ΔW = s · P (Q ⊙ Λ) with P = lora_B ∈ R^{out×r}, Λ = lora_E ∈ R^{r×1}, Q = lora_A ∈ R^{r×in}; on a conv2d
Q is r × in·k·k and ΔW is reshaped to the kernel, so the adapter is one convolution with ΔW.
Λ is multiplied by the plan's kept-rank mask. Orthogonality regulariser:
R = w · mean over {Q_l, P_l} of ‖Q Qᵀ − I‖_F and ‖Pᵀ P − I‖_F (kept triplets only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from peftdecl.plan import LayerPlan, Plan
from peftdecl_numpy.conv import conv_backward, conv_forward
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.layers import BaseLayer, dropout_mask

Params = dict[str, np.ndarray]
LAYER_TYPES = ("linear", "conv2d", "gpt2_conv1d")


def rank_mask(lp: LayerPlan) -> np.ndarray | None:
    """Kept triplets as an (r, 1) float mask, or None when all are kept."""
    mask = lp.options.get("rank_mask")
    return None if mask is None else np.asarray(mask, dtype=np.float64).reshape(-1, 1)


def singular_values(lp: LayerPlan, p: Params) -> np.ndarray:
    """Λ with the triplets outside the rank mask removed."""
    mask = rank_mask(lp)
    return p["lora_E"] if mask is None else p["lora_E"] * mask


def _conv_args(lp: LayerPlan) -> tuple[Any, Any, Any]:
    return lp.layer.stride, lp.layer.padding, lp.layer.dilation


class AdaLoraOps:
    kind = "adalora"
    additive = True

    def forward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        y = base.forward(x)
        mask = dropout_mask(ctx.rng, x.shape, lp.options["dropout"]) if ctx.training else None
        h = x if mask is None else x * mask
        qe = p["lora_A"] * singular_values(lp, p)
        if lp.layer.is_conv:
            delta = self.delta_weight(lp, base, p)
            return y + conv_forward(h, delta, *_conv_args(lp)), {"x": x, "h": h, "mask": mask}
        u = h @ qe.T
        return y + lp.scaling * (u @ p["lora_B"].T), {"x": x, "h": h, "u": u, "mask": mask}

    def backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray | None, Params]:
        s, x, h, mask = lp.scaling, cache["x"], cache["h"], cache["mask"]
        a, b, e = p["lora_A"], p["lora_B"], singular_values(lp, p)
        qe = a * e
        if lp.layer.is_conv:
            dh, d_delta = conv_backward(h, self.delta_weight(lp, base, p), dy, *_conv_args(lp))
            d_m = s * d_delta.reshape(d_delta.shape[0], -1)  # dL/d(P·QΛ)
            grad_b = d_m @ qe.T
            grad_qe = b.T @ d_m
        else:
            dv = s * dy
            u = cache["u"]
            grad_b = dv.reshape(-1, dv.shape[-1]).T @ u.reshape(-1, u.shape[-1])
            du = dv @ b
            grad_qe = du.reshape(-1, du.shape[-1]).T @ h.reshape(-1, h.shape[-1])
            dh = du @ qe
        grad_e = np.sum(grad_qe * a, axis=1, keepdims=True)
        keep = rank_mask(lp)
        grads = {"lora_A": grad_qe * e, "lora_E": grad_e if keep is None else grad_e * keep, "lora_B": grad_b}
        dx = base.input_grad(x, dy)
        assert dx is not None and dh is not None
        return dx + (dh if mask is None else dh * mask), grads

    def delta_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        delta = lp.scaling * (p["lora_B"] @ (p["lora_A"] * singular_values(lp, p)))
        return delta.reshape(base.weight.shape)

    def merge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        return base.weight + self.delta_weight(lp, base, p), base.bias

    def unmerge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        return base.weight - self.delta_weight(lp, base, p), base.bias


def _gram_penalty(m: np.ndarray, rows: bool) -> tuple[float, np.ndarray]:
    """‖M Mᵀ − I‖_F (rows) or ‖Mᵀ M − I‖_F (columns), and its gradient with respect to M."""
    gram = m @ m.T if rows else m.T @ m
    c = gram - np.eye(gram.shape[0])
    norm = float(np.linalg.norm(c))
    if norm == 0.0:  # the norm's subgradient at an exactly orthonormal M: take 0, as torch does
        return 0.0, np.zeros_like(m)
    return norm, (2.0 * c @ m if rows else 2.0 * m @ c) / norm


def orthogonal_regularizer(
    plan: Plan, params: Mapping[str, np.ndarray], weight: float | None = None
) -> tuple[float, dict[str, np.ndarray]]:
    """HF PEFT's loss term w · mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F over every layer) and its gradient by key.

    ``weight`` defaults to the spec's ``orth_reg_weight``; triplets outside a layer's rank mask do not
    exist, as in the pruned modules PEFT loads. lora_E does not enter the term.
    """
    w = float(plan.spec.orth_reg_weight if weight is None else weight)
    total, grads = 0.0, {}
    count = 2 * len(plan.layers)
    for lp in plan.layers:
        kept = (
            np.ones(lp.r, bool)
            if lp.options.get("rank_mask") is None
            else np.asarray(lp.options["rank_mask"])
        )
        for name, rows in (("lora_A", True), ("lora_B", False)):
            key = lp.key(name)
            if key not in params:
                raise KeyError(f"orthogonal_regularizer: no tensor {key} among the parameters given")
            value = np.asarray(params[key], dtype=np.float64)
            index = (kept,) if rows else (slice(None), kept)
            norm, grad = _gram_penalty(value[index], rows)
            full = np.zeros_like(value)
            full[index] = grad * (w / count)
            total += norm
            grads[key] = full
    return (w * total / count if count else 0.0), grads


OPS = AdaLoraOps()
