"""LoRA (Hu et al., 2021) on torch: y = W x + b + s · B A dropout(x), ΔW = s · B A.

Embedding: y = E[x] + s · (Aᵀ[x]) Bᵀ. Convolution: A is a k×k convolution to r channels (the base's stride and
padding, no dilation) and B a 1×1 convolution. A linear layer without dropout runs as one autograd Function:
forward ``addmm(W x + b, x Aᵀ, Bᵀ, alpha=s)`` and a hand-written backward that keeps only x.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds import _fused as fused

Params = dict[str, torch.Tensor]
LAYER_TYPES = ("linear", "embedding", "conv1d", "conv2d", "gpt2_conv1d")

SAVE_SHRINK = True
"""Keep x·Aᵀ (T·r numbers) for the backward pass instead of recomputing it from x: measured slightly faster
(benchmarks/compare_torch_peft.py); False saves only x."""


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ (+ s·b_B) with a frozen W; the backward pass needs only x (and x Aᵀ)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        b_bias: Any,
        scaling: float,
        stored_in_out: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = fused.linear(x2, fused.weight_ir(weight, stored_in_out), bias)
        u = torch.mm(x2, a.t())
        y.addmm_(u, b.t(), alpha=scaling)
        if b_bias is not None:
            y.add_(b_bias, alpha=scaling)
        ctx.scaling, ctx.stored_in_out = scaling, stored_in_out
        ctx.save_for_backward(x, weight, a, b, u if SAVE_SHRINK else None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, a, b, u = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, _, need_a, need_b, need_bias = ctx.needs_input_grad[:6]
        dyb = torch.mm(dy2, b).mul_(s)  # s · dy B, [T, r]
        dx = da = db = dbias = None
        if need_x:
            dx = torch.mm(dy2, fused.weight_ir(weight, ctx.stored_in_out)).addmm_(dyb, a).view(x.shape)
        if need_a:
            da = torch.mm(dyb.t(), x2)
        if need_b:
            shrink = u if u is not None else torch.mm(x2, a.t())
            db = torch.mm(shrink.t(), dy2).mul_(s).t()
        if need_bias:
            dbias = dy2.sum(0).mul_(s)
        return dx, None, None, da, db, dbias, None, None


def lora_linear(
    lp: LayerPlan, layer: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, b_bias: Any = None
) -> torch.Tensor:
    """The whole layer through :class:`LoraLinearFunction` (``a`` may be computed, e.g. AdaLoRA's Q ⊙ Λ)."""
    return LoraLinearFunction.apply(
        x, layer.base_layer.weight, layer.bias, a, b, b_bias, lp.scaling, lp.layer.type == "gpt2_conv1d"
    )


def _ones(n: int) -> tuple[int, ...]:
    return (1,) * n


def _conv(x: torch.Tensor, w: torch.Tensor, bias: Any, stride: Any, padding: Any) -> torch.Tensor:
    conv = F.conv1d if w.ndim == 3 else F.conv2d
    return conv(x, w, bias, stride, padding)


class LoraOps:
    kind = "lora"
    additive = True

    def forward(self, lp: LayerPlan, layer: Any, p: Params, x: torch.Tensor, result: Any) -> torch.Tensor:
        s = lp.scaling
        if result is None:
            if "lora_A.weight" in p and fused.fusable(
                lp, layer, x, p["lora_A.weight"].dtype, lp.options["dropout"]
            ):
                if not torch.is_grad_enabled() and fused.merge_pays(lp, x):
                    return self._merged_call(lp, layer, p, x)
                return lora_linear(lp, layer, x, p["lora_A.weight"], p["lora_B.weight"], p.get("lora_B.bias"))
            result = layer.base_forward(x)
        if lp.layer.type == "embedding":
            u = layer.embed(x, p["lora_embedding_A"].t())
            return _add_expand(result, u, p["lora_embedding_B"], s)
        rate = lp.options["dropout"]
        h = F.dropout(x, rate) if layer.training and rate > 0 else x
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            k = a.ndim - 2
            u = _conv(h, a, None, lp.layer.stride, lp.layer.padding)
            return result + s * _conv(u, b, p.get("lora_B.bias"), _ones(k), (0,) * k)
        u = F.linear(h, a)
        if "lora_B.bias" in p:
            return result + s * F.linear(u, b, p["lora_B.bias"])
        return _add_expand(result, u, b, s)

    @staticmethod
    def _merged_call(lp: LayerPlan, layer: Any, p: Params, x: torch.Tensor) -> torch.Tensor:
        # inference on many tokens: one matmul with W + s·B A beats the two skinny ones (dLoRA's rule)
        weight = torch.addmm(layer.weight_ir(), p["lora_B.weight"], p["lora_A.weight"], alpha=lp.scaling)
        bias = layer.bias
        if "lora_B.bias" in p:
            bias = p["lora_B.bias"] * lp.scaling if bias is None else bias + lp.scaling * p["lora_B.bias"]
        return F.linear(x, weight, bias)

    def delta_weight(self, lp: LayerPlan, layer: Any, p: Params) -> torch.Tensor:
        s = lp.scaling
        if lp.layer.type == "embedding":
            return s * (p["lora_embedding_B"] @ p["lora_embedding_A"]).t()
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            return s * torch.einsum("or,ri...->oi...", b.reshape(b.shape[0], b.shape[1]), a)
        return s * (b @ a)

    def merge(self, lp: LayerPlan, layer: Any, p: Params, cache: dict) -> tuple[torch.Tensor, Any]:
        weight = layer.weight_ir()
        return weight + self.delta_weight(lp, layer, p).to(weight.dtype), self._bias(lp, layer, p, +1.0)

    def unmerge(self, lp: LayerPlan, layer: Any, p: Params, cache: dict) -> tuple[torch.Tensor, Any]:
        weight = layer.weight_ir()
        return weight - self.delta_weight(lp, layer, p).to(weight.dtype), self._bias(lp, layer, p, -1.0)

    @staticmethod
    def _bias(lp: LayerPlan, layer: Any, p: Params, sign: float) -> Any:
        if "lora_B.bias" not in p:
            return None
        if layer.bias is None:
            raise PeftdeclError(
                f"{lp.module}: cannot merge lora_bias into a layer without a bias (as in HF PEFT)"
            )
        return layer.bias + (sign * lp.scaling * p["lora_B.bias"]).to(layer.bias.dtype)


def _add_expand(result: torch.Tensor, u: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """result + s · u Bᵀ as one addmm over the flattened rows."""
    out = torch.addmm(result.reshape(-1, result.shape[-1]), u.reshape(-1, u.shape[-1]), b.t(), alpha=s)
    return out.view(result.shape)


OPS = LoraOps()
