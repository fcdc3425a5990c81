"""LoRA (Hu et al., 2021) on torch: y = W x + b + s · B A dropout(x), ΔW = s · B A.

Embedding: y = E[x] + s · (Aᵀ[x]) Bᵀ. Convolution: A is a k×k convolution to r channels (the base's stride and
padding, no dilation) and B a 1×1 convolution with the base's groups (a grouped conv cannot merge).

A linear layer without dropout runs as one autograd Function (``lora_linear``, which AdaLoRA shares with
A = Q ⊙ Λ), in one of three forms chosen by the cost rules of :mod:`._fused` (T tokens, W d_out × d_in, rank r):

- inference on many tokens (T·(d_in + d_out) ≥ d_in·d_out): one matmul with W' = W + s·B A;
- training on many tokens, float32/float64 (:class:`LoraLinearFunction`, ``merged``): forward y = x W'ᵀ + b and
  u = x Aᵀ; backward dx = dy W', then dA = (s·dy B)ᵀ x and dB = s·dyᵀ u. W' is rebuilt in backward
  (d_in·d_out·r work) rather than kept, so only x and u (T·r numbers) stay alive between the passes; no
  T × d_out update is ever materialised. The thin products are stacked onto the big ones,
  [y | u] = x [W'; A]ᵀ and [dx | s·dy B] = dy [W' | s·B];
- otherwise (the same Function, not ``merged``): ``addmm(W x + b, x Aᵀ, Bᵀ, alpha=s)`` and a hand-written backward,
  which keeps u = x Aᵀ for dB when the engine option ``save_shrink`` is on (else recomputes it from x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.lora import refuse_grouped_merge
from peftdecl_torch import cuda_kernels
from peftdecl_torch.kinds import _fused as fused
from peftdecl_torch.kinds._additive import AddedProduct, Params

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


class LoraContext(fused.ScaledContext, Protocol):
    """The ctx of :class:`LoraLinearFunction`: which of its two forms ran."""

    merged: bool


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ (+ s·b_B) with a frozen W; the backward pass needs only x (and u = x Aᵀ).

    Two forms (the math of the module docstring): ``merged`` stacks the thin products onto the big ones through
    W' = W + s·B A, rebuilt in backward rather than kept (u is always kept); otherwise the update is added with
    ``addmm`` and u is kept only with ``save_shrink``. Both share the gradients of A, B and b_B."""

    @staticmethod
    def forward(
        ctx: LoraContext,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        b_bias: torch.Tensor | None,
        scaling: float,
        stored_in_out: bool,
        save_shrink: bool = True,
        merged: bool = False,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        w = fused.weight_ir(weight, stored_in_out)
        ctx.scaling, ctx.stored_in_out, ctx.merged = scaling, stored_in_out, merged
        if merged:  # [y | u] = x [W'; A]ᵀ, W' = W + s·B A (not kept), the bias plus s·b_B added on the way
            d_out, d_in, r = b.shape[0], a.shape[1], a.shape[0]
            full_bias = bias
            if b_bias is not None:
                full_bias = b_bias * scaling if bias is None else torch.add(bias, b_bias, alpha=scaling)
            stacked = x2.new_empty(d_out + r, d_in)  # [W + s·B A ; A]
            torch.addmm(w, b, a, alpha=scaling, out=stacked[:d_out])
            stacked[d_out:].copy_(a)
            yu = torch.mm(x2, stacked.t())
            # a contiguous y; u copied out so that it does not keep yu alive
            y = yu[:, :d_out].contiguous() if full_bias is None else torch.add(yu[:, :d_out], full_bias)
            u = yu[:, d_out:].contiguous()
        else:
            y = fused.linear(x2, w, bias)
            u = torch.mm(x2, a.t())
            y.addmm_(u, b.t(), alpha=scaling)
            if b_bias is not None:
                y.add_(b_bias, alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, u if merged or save_shrink else None)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: LoraContext, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors  # read once: non-reentrant activation checkpointing unpacks on each read
        x, weight, a, b = saved[:4]
        u: torch.Tensor | None = saved[4]  # None unless the forward kept it
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, _, need_a, need_b, need_bias = ctx.needs_input_grad[:6]
        w = fused.weight_ir(weight, ctx.stored_in_out)
        dx = da = db = dbias = None
        if need_x and ctx.merged:
            dx, dyb = _merged_input_grad(dy2, w, a, b, s)
            dx = dx.view(x.shape)
        else:
            dyb = torch.mm(dy2, b).mul_(s)  # s · dy B, [T, r]
            if need_x:
                dx = torch.mm(dy2, w).addmm_(dyb, a).view(x.shape)
        if need_a:
            da = fused.tn(dyb, x2)
        if need_b:
            shrink = u if u is not None else torch.mm(x2, a.t())
            db = fused.tn(shrink, dy2).mul_(s).t()
        if need_bias:
            dbias = dy2.sum(0).mul_(s)
        return dx, None, None, da, db, dbias, None, None, None, None


def _merged_input_grad(
    dy2: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, s · dy B) as one product [dx | s·dy B] = dy [W' | s·B], W' = W + s·B A rebuilt."""
    d_in = a.shape[1]
    stacked = dy2.new_empty(b.shape[0], d_in + a.shape[0])  # [W + s·B A | s·B]
    torch.addmm(w, b, a, alpha=s, out=stacked[:, :d_in])
    torch.mul(b, s, out=stacked[:, d_in:])
    out = torch.mm(dy2, stacked)
    return out[:, :d_in].contiguous(), out[:, d_in:]


def lora_linear(
    lp: LayerPlan,
    layer: AdaptedLayer,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    b_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole layer in the form the cost rules pick (``a`` may be computed, e.g. AdaLoRA's Q ⊙ Λ); inference
    on many tokens is one matmul with W + s·B A (and the bias plus s·b_B)."""
    a, b = fused.compute_dtype(x, a, b)
    if b_bias is not None:
        (b_bias,) = fused.compute_dtype(x, b_bias)
    weight, bias, s = layer.base_weight, layer.bias, lp.scaling
    if not torch.is_grad_enabled() and fused.merge_pays(lp, layer, x):
        if b_bias is not None:
            bias = b_bias * s if bias is None else bias + s * b_bias
        return F.linear(x, torch.addmm(layer.weight_ir(), b, a, alpha=s), bias)
    stored_in_out = lp.layer.type == "gpt2_conv1d"
    merged, save_shrink = fused.merge_for_training(lp, layer, x), layer.options.save_shrink
    y: torch.Tensor = LoraLinearFunction.apply(
        x, weight, bias, a, b, b_bias, s, stored_in_out, save_shrink, merged
    )
    return y


def _ones(n: int) -> tuple[int, ...]:
    return (1,) * n


def _conv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    groups: int = 1,
) -> torch.Tensor:
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.ndim]
    return conv(x, w, bias, stride, padding, 1, groups)


class LoraOps(AddedProduct):
    """LoRA's :class:`peftdecl.backend.AdditiveOps`: Δ(x) = s · B A dropout(x)."""

    kind = "lora"
    additive = True
    half_compute = True  # the fused Function may run float32 adapters in a half base dtype (_fused)

    @cuda_kernels.replaces("lora_forward")
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
            delta = s * _conv(u, b, p.get("lora_B.bias"), _ones(k), (0,) * k, lp.layer.groups)
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
            refuse_grouped_merge(lp)
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
