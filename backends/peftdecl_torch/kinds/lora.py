"""LoRA (Hu et al., 2021) on torch: y = W x + b + s · B A dropout(x), ΔW = s · B A.

Embedding: y = E[x] + s · (Aᵀ[x]) Bᵀ. Convolution: A is a k×k convolution to r channels (the base's stride and
padding, no dilation) and B a 1×1 convolution.

A linear layer without dropout runs as one autograd Function (``lora_linear``, which AdaLoRA shares with
A = Q ⊙ Λ), in one of three forms chosen by the cost rules of :mod:`._fused` (T tokens, W d_out × d_in, rank r):

- inference on many tokens (T·(d_in + d_out) ≥ d_in·d_out): one matmul with W' = W + s·B A;
- training on many tokens, float32/float64 (:class:`MergedLoraLinearFunction`): forward y = x W'ᵀ + b and
  u = x Aᵀ; backward dx = dy W', then dA = (s·dy B)ᵀ x and dB = s·dyᵀ u. W' is rebuilt in backward
  (d_in·d_out·r work) rather than kept, so only x and u (T·r numbers) stay alive between the passes; no
  T × d_out update is ever materialised. The thin products are stacked onto the big ones,
  [y | u] = x [W'; A]ᵀ and [dx | s·dy B] = dy [W' | s·B];
- otherwise (:class:`LoraLinearFunction`): ``addmm(W x + b, x Aᵀ, Bᵀ, alpha=s)`` and a hand-written backward,
  which keeps u = x Aᵀ for dB when the engine option ``save_shrink`` is on (else recomputes it from x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds import _fused as fused
from peftdecl_torch.kinds._additive import AddedProduct, Params

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ (+ s·b_B) with a frozen W; the backward pass needs only x (and x Aᵀ)."""

    @staticmethod
    def forward(
        ctx: fused.ScaledContext,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        b_bias: torch.Tensor | None,
        scaling: float,
        stored_in_out: bool,
        save_shrink: bool = True,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = fused.linear(x2, fused.weight_ir(weight, stored_in_out), bias)
        u = torch.mm(x2, a.t())
        y.addmm_(u, b.t(), alpha=scaling)
        if b_bias is not None:
            y.add_(b_bias, alpha=scaling)
        ctx.scaling, ctx.stored_in_out = scaling, stored_in_out
        ctx.save_for_backward(x, weight, a, b, u if save_shrink else None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: fused.ScaledContext, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b = ctx.saved_tensors[:4]
        u: torch.Tensor | None = ctx.saved_tensors[4]  # None unless the forward kept it (save_shrink)
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, _, need_a, need_b, need_bias = ctx.needs_input_grad[:6]
        dyb = torch.mm(dy2, b).mul_(s)  # s · dy B, [T, r]
        dx = da = db = dbias = None
        if need_x:
            dx = torch.mm(dy2, fused.weight_ir(weight, ctx.stored_in_out)).addmm_(dyb, a).view(x.shape)
        if need_a:
            da = fused.tn(dyb, x2)
        if need_b:
            shrink = u if u is not None else torch.mm(x2, a.t())
            db = fused.tn(shrink, dy2).mul_(s).t()
        if need_bias:
            dbias = dy2.sum(0).mul_(s)
        return dx, None, None, da, db, dbias, None, None, None


class MergedLoraLinearFunction(torch.autograd.Function):
    """The same layer with the update merged into the weight per call; the math of the module docstring.

    Saves x, A, B and u = x Aᵀ, never W' (an out × in matrix per layer would outlive the forward pass)."""

    @staticmethod
    def forward(
        ctx: fused.ScaledContext,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        b_bias: torch.Tensor | None,
        scaling: float,
        stored_in_out: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        d_out, d_in, r = b.shape[0], a.shape[1], a.shape[0]
        w = fused.weight_ir(weight, stored_in_out)
        full_bias = bias
        if b_bias is not None:
            full_bias = b_bias * scaling if bias is None else torch.add(bias, b_bias, alpha=scaling)
        ctx.scaling, ctx.stored_in_out = scaling, stored_in_out
        stacked = x2.new_empty(d_out + r, d_in)  # [W + s·B A ; A]
        torch.addmm(w, b, a, alpha=scaling, out=stacked[:d_out])
        stacked[d_out:].copy_(a)
        yu = torch.mm(x2, stacked.t())
        # a contiguous y (the bias added on the way); u copied out so that it does not keep yu alive
        y = yu[:, :d_out].contiguous() if full_bias is None else torch.add(yu[:, :d_out], full_bias)
        u = yu[:, d_out:].contiguous()
        ctx.save_for_backward(x, weight, a, b, u)
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx: fused.ScaledContext, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, u = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, _, need_a, need_b, need_bias = ctx.needs_input_grad[:6]
        d_in = a.shape[1]
        dx = da = db = dbias = None
        w = fused.weight_ir(weight, ctx.stored_in_out)
        if need_x:
            stacked = dy2.new_empty(b.shape[0], d_in + a.shape[0])  # [W + s·B A | s·B]
            torch.addmm(w, b, a, alpha=s, out=stacked[:, :d_in])
            torch.mul(b, s, out=stacked[:, d_in:])
            out = torch.mm(dy2, stacked)
            dx = out[:, :d_in].contiguous().view(x.shape)
            dyb = out[:, d_in:]  # s · dy B, [T, r]
        else:
            dyb = torch.mm(dy2, b).mul_(s)
        if need_a:
            da = fused.tn(dyb, x2)
        if need_b:
            db = fused.tn(u, dy2).mul_(s).t()
        if need_bias:
            dbias = dy2.sum(0).mul_(s)
        return dx, None, None, da, db, dbias, None, None


def merged_linear(
    lp: LayerPlan,
    layer: AdaptedLayer,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    b_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference: one matmul with W + s·B A (and the bias plus s·b_B)."""
    s = lp.scaling
    weight = torch.addmm(layer.weight_ir(), b, a, alpha=s)
    bias = layer.bias
    if b_bias is not None:
        bias = b_bias * s if bias is None else bias + s * b_bias
    return F.linear(x, weight, bias)


def lora_linear(
    lp: LayerPlan,
    layer: AdaptedLayer,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    b_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole layer in the form the cost rules pick (``a`` may be computed, e.g. AdaLoRA's Q ⊙ Λ)."""
    a, b = fused.compute_dtype(x, a, b)
    if b_bias is not None:
        (b_bias,) = fused.compute_dtype(x, b_bias)
    if not torch.is_grad_enabled() and fused.merge_pays(lp, layer, x):
        return merged_linear(lp, layer, x, a, b, b_bias)
    stored_in_out = lp.layer.type == "gpt2_conv1d"
    weight, bias, s = layer.base_weight, layer.bias, lp.scaling
    if fused.merge_for_training(lp, layer, x):
        merged: torch.Tensor = MergedLoraLinearFunction.apply(x, weight, bias, a, b, b_bias, s, stored_in_out)
        return merged
    save_shrink = layer.options.save_shrink
    y: torch.Tensor = LoraLinearFunction.apply(x, weight, bias, a, b, b_bias, s, stored_in_out, save_shrink)
    return y


def _ones(n: int) -> tuple[int, ...]:
    return (1,) * n


def _conv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
) -> torch.Tensor:
    conv = F.conv1d if w.ndim == 3 else F.conv2d
    return conv(x, w, bias, stride, padding)


class LoraOps(AddedProduct):
    """LoRA's :class:`peftdecl.backend.AdditiveOps`: Δ(x) = s · B A dropout(x)."""

    kind = "lora"
    additive = True
    half_compute = True  # the fused Function may run float32 adapters in a half base dtype (_fused)

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        """W x + b + Δ(x): the fused Function where it applies, else the base layer plus Δ(x)."""
        if "lora_A.weight" in p and fused.fusable(
            lp, layer, x, p["lora_A.weight"].dtype, lp.options["dropout"], half_compute=True
        ):
            return lora_linear(lp, layer, x, p["lora_A.weight"], p["lora_B.weight"], p.get("lora_B.bias"))
        return self.unfused(lp, layer, p, x)

    def _apply(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor | None
    ) -> torch.Tensor:
        s = lp.scaling
        if lp.layer.type == "embedding":
            u = layer.embed(x, p["lora_embedding_A"].t())
            return _add_expand(result, u, p["lora_embedding_B"], s)
        h = layer.dropout(x, lp.options["dropout"])
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            k = a.ndim - 2
            u = _conv(h, a, None, lp.layer.stride, lp.layer.padding)
            delta = s * _conv(u, b, p.get("lora_B.bias"), _ones(k), (0,) * k)
            return delta if result is None else result + delta
        u = F.linear(h, a)
        if "lora_B.bias" in p:
            delta = s * F.linear(u, b, p["lora_B.bias"])
            return delta if result is None else result + delta
        return _add_expand(result, u, b, s)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        s = lp.scaling
        if lp.layer.type == "embedding":
            return s * (p["lora_embedding_B"] @ p["lora_embedding_A"]).t()
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            return s * torch.einsum("or,ri...->oi...", b.reshape(b.shape[0], b.shape[1]), a)
        return s * (b @ a)

    def merged_bias(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, sign: float) -> torch.Tensor | None:
        """b ± s · b_B where the adapter has a bias (``lora_bias``)."""
        if "lora_B.bias" not in p:
            return None
        if layer.bias is None:
            raise PeftdeclError(
                f"{lp.module}: cannot merge lora_bias into a layer without a bias (as in HF PEFT)"
            )
        return layer.bias + (sign * lp.scaling * p["lora_B.bias"]).to(layer.bias.dtype)


def _add_expand(result: torch.Tensor | None, u: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """result + s · u Bᵀ as one addmm over the flattened rows (s · u Bᵀ alone when result is None)."""
    u2 = u.reshape(-1, u.shape[-1])
    if result is None:
        return torch.mm(u2, b.t()).mul_(s).view(*u.shape[:-1], b.shape[0])
    out = torch.addmm(result.reshape(-1, result.shape[-1]), u2, b.t(), alpha=s)
    return out.view(result.shape)


OPS = LoraOps()
