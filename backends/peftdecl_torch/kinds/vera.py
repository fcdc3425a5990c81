"""VeRA (Kopiczko et al., 2024) on torch: y = W x + b + λ_b ⊙ B (λ_d ⊙ A dropout(x)), no scaling.

A = vera_A[:r, :in] and B = vera_B[:out, :r] are the shared frozen projections. λ_b is folded into B's rows, so
the adapter adds one ``addmm``: y = W x + b + (λ_d ⊙ x Aᵀ)(λ_b ⊙ B)ᵀ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.plan import LayerPlan
from peftdecl_torch import cuda_kernels
from peftdecl_torch.kinds import _fused as fused
from peftdecl_torch.kinds._additive import AddedProduct, Params
from peftdecl_torch.kinds.lora import _add_expand

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


def _projections(lp: LayerPlan, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    return p["vera_A"][: lp.r, : lp.layer.in_features], p["vera_B"][: lp.layer.out_features, : lp.r]


class VeraLinearFunction(torch.autograd.Function):
    """y = x (W + (λ_b ⊙ B)(λ_d ⊙ A))ᵀ + b for a frozen W: one matmul with the merged weight, which is kept for
    dL/dx (rebuilding it costs out·r·in again). The λ gradients share M = dyᵀ (x Aᵀ):
    dλ_b = Σ_r B ⊙ λ_d ⊙ M, dλ_d = Σ_o λ_b ⊙ B ⊙ M."""

    @staticmethod
    def forward(
        ctx: fused.FunctionContext,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        lam_d: torch.Tensor,
        lam_b: torch.Tensor,
        stored_in_out: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        merged = torch.addmm(fused.weight_ir(weight, stored_in_out), b * lam_b[:, None], a * lam_d[:, None])
        y = fused.linear(x2, merged, bias)
        ctx.save_for_backward(x, merged, a, b, lam_d, lam_b)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: fused.FunctionContext, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged, a, b, lam_d, lam_b = ctx.saved_tensors
        need_x, _, _, _, _, need_d, need_b = ctx.needs_input_grad[:7]
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = d_lam_d = d_lam_b = None
        if need_x:
            dx = torch.mm(dy2, merged).view(x.shape)
        if need_d or need_b:
            mixed = (torch.mm(x2, a.t()).t() @ dy2).t() * b  # (dyᵀ x Aᵀ) ⊙ B, [out, r]
            d_lam_b = (mixed * lam_d).sum(1) if need_b else None
            d_lam_d = (mixed * lam_b[:, None]).sum(0) if need_d else None
        return dx, None, None, None, None, d_lam_d, d_lam_b, None


class VeraOps(AddedProduct):
    """VeRA's :class:`peftdecl.backend.AdditiveOps`: Δ(x) = λ_b ⊙ B (λ_d ⊙ A dropout(x))."""

    kind = "vera"
    additive = True

    @cuda_kernels.replaces("vera_forward")
    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        a, b = _projections(lp, p)
        if fused.fusable(lp, layer, x, b.dtype, lp.options["dropout"]):
            stored_in_out = lp.layer.type == "gpt2_conv1d"
            lam_d, lam_b = p["vera_lambda_d"], p["vera_lambda_b"]
            weight, bias = layer.base_weight, layer.bias
            y: torch.Tensor = VeraLinearFunction.apply(x, weight, bias, a, b, lam_d, lam_b, stored_in_out)
            return y
        return self.unfused(lp, layer, p, x)

    def _apply(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor | None
    ) -> torch.Tensor:
        a, b = _projections(lp, p)
        u = F.linear(layer.dropout(x, lp.options["dropout"]), a) * p["vera_lambda_d"]
        return _add_expand(result, u, b * p["vera_lambda_b"][:, None], 1.0)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        a, b = _projections(lp, p)
        return (p["vera_lambda_b"][:, None] * b) @ (p["vera_lambda_d"][:, None] * a)


OPS = VeraOps()
