"""AdaLoRA (Zhang et al., 2023): y = W x + b + s · P (Q ⊙ Λ) dropout(x), s = α / (init_r + 1e-5).

ΔW = s · P (Q ⊙ Λ) with P = lora_B ∈ R^{out×r}, Λ = lora_E ∈ R^{r×1}, Q = lora_A ∈ R^{r×in}; on a conv2d
Q is r × in·k·k and ΔW is reshaped to the kernel, so the adapter is one convolution with ΔW.
Λ is multiplied by the plan's kept-rank mask. Orthogonality regulariser:
R = w · mean over {Q_l, P_l} of ‖Q Qᵀ − I‖_F and ‖Pᵀ P − I‖_F (kept triplets only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from peftdecl.plan import LayerPlan, Plan
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl_numpy.conv import conv_backward, conv_forward
from peftdecl_numpy.kinds.base import AdditiveKind, Params, Tape
from peftdecl_numpy.layers import BaseLayer, dropout_mask, rows
from peftdecl_numpy.xp_ops import Array, Namespace, namespace


def rank_mask(lp: LayerPlan, like: Array) -> Array | None:
    """Kept triplets as an (r, 1) float mask in ``like``'s namespace and dtype, or None when all are kept."""
    mask = lp.options.get("rank_mask")
    if mask is None:
        return None
    xp = namespace(like)
    return xp.reshape(xp.asarray([1.0 if kept else 0.0 for kept in mask], dtype=like.dtype), (-1, 1))


def singular_values(lp: LayerPlan, p: Params) -> Array:
    """Λ with the triplets outside the rank mask removed."""
    mask = rank_mask(lp, p["lora_E"])
    return p["lora_E"] if mask is None else p["lora_E"] * mask


def _conv_args(lp: LayerPlan) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    return lp.layer.stride, lp.layer.padding, lp.layer.dilation


class AdaLoraOps(AdditiveKind):
    kind = "adalora"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        mask = dropout_mask(layer, x.shape, lp.options["dropout"])
        h = x if mask is None else x * mask
        if lp.layer.is_conv:
            return conv_forward(h, self.delta_weight(lp, layer, p), *_conv_args(lp)), {"h": h, "mask": mask}
        u = h @ (p["lora_A"] * singular_values(lp, p)).T
        return lp.scaling * (u @ p["lora_B"].T), {"h": h, "u": u, "mask": mask}

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        xp, s, h, mask = layer.xp, lp.scaling, tape["h"], tape["mask"]
        a, b, e = p["lora_A"], p["lora_B"], singular_values(lp, p)
        qe = a * e
        if lp.layer.is_conv:
            dh, d_delta_w = conv_backward(h, self.delta_weight(lp, layer, p), d_delta, *_conv_args(lp))
            d_m = s * xp.reshape(d_delta_w, (d_delta_w.shape[0], -1))  # dL/d(P·QΛ)
            grad_b = d_m @ qe.T
            grad_qe = b.T @ d_m
        else:
            dv = s * d_delta
            grad_b = rows(dv).T @ rows(tape["u"])
            du = dv @ b
            grad_qe = rows(du).T @ rows(h)
            dh = du @ qe
        grad_e = xp.sum(grad_qe * a, axis=1, keepdims=True)
        keep = rank_mask(lp, e)
        grads = {"lora_A": grad_qe * e, "lora_E": grad_e if keep is None else grad_e * keep, "lora_B": grad_b}
        assert dh is not None
        return (dh if mask is None else dh * mask), grads

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        delta = lp.scaling * (p["lora_B"] @ (p["lora_A"] * singular_values(lp, p)))
        return layer.xp.reshape(delta, layer.weight.shape)


def _gram_penalty(xp: Namespace, m: Array, rows: bool) -> tuple[Array, Array]:
    """‖M Mᵀ − I‖_F (rows) or ‖Mᵀ M − I‖_F (columns), and its gradient with respect to M."""
    gram = m @ m.T if rows else m.T @ m
    c = gram - xp.eye(gram.shape[0], dtype=m.dtype)
    norm = xp.linalg.matrix_norm(c)
    if float(norm) == 0.0:  # the norm's subgradient at an exactly orthonormal M: take 0, as torch does
        return norm, xp.zeros_like(m)
    return norm, (2.0 * c @ m if rows else 2.0 * m @ c) / norm


def orthogonal_regularizer(
    plan: Plan, params: Mapping[str, Array], weight: float | None = None
) -> tuple[float, dict[str, Array]]:
    """HF PEFT's loss term w · mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F over every layer) and its gradient by key.

    ``weight`` defaults to the spec's ``orth_reg_weight``; triplets outside a layer's rank mask do not
    exist, as in the pruned modules PEFT loads. lora_E does not enter the term. The gradients are arrays of the
    parameters' own namespace.
    """
    w = float(cast(AdaLoraSpec, plan.spec).orth_reg_weight if weight is None else weight)
    total, grads = 0.0, {}
    count = 2 * len(plan.layers)
    for lp in plan.layers:
        for name, by_rows in (("lora_A", True), ("lora_B", False)):
            key = lp.key(name)
            if key not in params:
                raise KeyError(f"orthogonal_regularizer: no tensor {key} among the parameters given")
            value = params[key]
            xp = namespace(value)
            mask = lp.options.get("rank_mask")
            kept = list(range(lp.r)) if mask is None else [i for i, k in enumerate(mask) if k]
            index = xp.asarray(kept, dtype=xp.int64)
            axis = 0 if by_rows else 1
            norm, grad = _gram_penalty(xp, xp.take(value, index, axis=axis), by_rows)
            # scatter the kept rows (columns) back: a one-hot [r, kept] selection
            select = xp.astype(
                xp.reshape(xp.arange(lp.r, dtype=xp.int64), (-1, 1)) == xp.reshape(index, (1, -1)),
                value.dtype,
            )
            full = select @ grad if by_rows else grad @ select.T
            total += float(norm)
            grads[key] = full * (w / count)
    return (w * total / count if count else 0.0), grads


OPS = AdaLoraOps()
