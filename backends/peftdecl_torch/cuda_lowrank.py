"""LoRA, AdaLoRA and DoRA through the low-rank kernels (``kernels/lora.cu``, ``kernels/dora.cu``): the paths their
``@cuda_kernels.replaces`` hooks run, and the autograd Functions of the linear layer.

Covered: a linear (or GPT-2 Conv1D) layer that the torch backend would run through its fused Function (a frozen
base, one dtype or a half-precision base with float32 adapters, no autocast, no dropout while training, see
:func:`peftdecl_torch.kinds._fused.fusable`), activations in ``kernels.dtypes``, and a call where folding the
update into the weight does not pay (:func:`peftdecl_torch.kinds._fused.merge_pays`; there one GEMM with
W + s·B A is the faster form, and the torch path runs it). DoRA, on a linear layer whose weight, A, B and
magnitude share one dtype: its row norm n = ‖W + s·B A‖ always, and its output (:class:`DoraLowRank`) under the
same conditions as LoRA with every n > 0. Everything else returns ``NotImplemented`` (the torch path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.plan import LayerPlan
from peftdecl_torch.cuda_kernels import on_device
from peftdecl_torch.kinds import _fused as fused

if TYPE_CHECKING:
    from peftdecl_torch.cuda_functions import Kernels
    from peftdecl_torch.layer import AdaptedLayer

Params = dict[str, torch.Tensor]


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation type of an element type: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Ctx(fused.ScaledContext, Protocol):
    kern: Kernels
    shape: torch.Size


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


class LowRankLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·((x Aᵀ) ⊙ e) Bᵀ (+ s·b_B) for a frozen W, e per rank (AdaLoRA's Λ) or None: W x + b by
    torch's GEMM, u = (x Aᵀ) ⊙ e by the shrink kernel, and s·u Bᵀ added into y in place by the expand kernel.

    Backward: du = s·dy B (a shrink with Aᵀ := B), dx = dy W + (du ⊙ e) A (torch's GEMM, then an expand into it),
    G = duᵀ x (the outer kernel) is dL/d(A ⊙ e), so dA = G ⊙ e and de = Σ_k G ⊙ A; dB = s·dyᵀ u (the outer
    kernel written through dBᵀ), u kept from the forward or, without ``save_shrink``, shrunk again."""

    @staticmethod
    def forward(
        ctx: _Ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        b_bias: torch.Tensor | None,
        e: torch.Tensor | None,
        scaling: float,
        stored_in_out: bool,
        save_shrink: bool,
        kern: Kernels,
    ) -> torch.Tensor:
        x2 = _rows(x)
        y = F.linear(x2, fused.weight_ir(weight, stored_in_out), bias).contiguous()
        u = kern.shrink(x2, a, 1.0, e)
        kern.expand(u, b, y, scaling)
        if b_bias is not None:
            y.add_(b_bias, alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, e, u if save_shrink else None)
        ctx.kern, ctx.scaling, ctx.stored_in_out, ctx.shape = kern, scaling, stored_in_out, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: _Ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors  # read once: non-reentrant activation checkpointing unpacks on each read
        x2, weight, a, b = saved[:4]
        e: torch.Tensor | None = saved[4]  # None for LoRA
        u: torch.Tensor | None = saved[5]  # None without save_shrink
        kern, s = ctx.kern, ctx.scaling
        need_x, _, _, need_a, need_b, need_bias, need_e = ctx.needs_input_grad[:7]
        dy2 = _rows(dy)
        dx = da = db = dbias = de = None
        if need_x or need_a or need_e:
            du = kern.shrink(dy2, b.t(), s, None)  # s · dy B, [T, r] in the accumulation type
            if need_x:
                dx = torch.mm(dy2, fused.weight_ir(weight, ctx.stored_in_out))
                kern.expand(du if e is None else du * e, a.t(), dx, 1.0)
                dx = dx.view(ctx.shape)
            if need_a or need_e:
                g = torch.empty(a.shape, dtype=a.dtype if e is None else du.dtype, device=a.device)
                kern.outer(du, x2, g, 1.0)  # dL/d(A ⊙ e)
                if e is None:
                    da = g
                else:
                    da = (g * e[:, None]).to(a.dtype) if need_a else None
                    de = (g * a.to(g.dtype)).sum(1).to(e.dtype) if need_e else None
        if need_b:
            shrink = u if u is not None else kern.shrink(x2, a, 1.0, e)
            db = torch.empty_like(b)
            kern.outer(shrink, dy2, db.t(), s)
        if need_bias:
            dbias = dy2.sum(0).mul_(s)
        return dx, None, None, da, db, dbias, de, None, None, None, None


def _linear(
    kern: Kernels,
    lp: LayerPlan,
    layer: AdaptedLayer,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    b_bias: torch.Tensor | None,
    e: torch.Tensor | None,
) -> Any:
    """The layer through :class:`LowRankLinear`, for a call :func:`fused.fusable` already admitted."""
    weight, bias = layer.base_weight, layer.bias
    merge = (
        fused.merge_for_training(lp, layer, x) if torch.is_grad_enabled() else fused.merge_pays(lp, layer, x)
    )
    if (
        merge
        or x.dtype not in kern.dtypes
        or not on_device(x, weight, bias, a, b, b_bias, e)
        or (e is not None and e.dtype != accumulation(x.dtype))
        or x.numel() == 0
    ):
        return NotImplemented
    a, b = fused.compute_dtype(x, a, b)
    if b_bias is not None:
        (b_bias,) = fused.compute_dtype(x, b_bias)
    stored_in_out = lp.layer.type == "gpt2_conv1d"
    y: torch.Tensor = LowRankLinear.apply(
        x, weight, bias, a, b, b_bias, e, lp.scaling, stored_in_out, layer.options.save_shrink, kern
    )
    return y


def lora_forward(
    kern: Kernels, ops: object, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor
) -> Any:
    """LoRA on a linear layer: W x + b + s·B A x (+ s·b_B) with the shrink and expand kernels."""
    if "lora_A.weight" not in p:  # an embedding
        return NotImplemented
    a = p["lora_A.weight"]
    if not fused.fusable(lp, layer, x, a.dtype, lp.options["dropout"], half_compute=True):
        return NotImplemented
    return _linear(kern, lp, layer, x, a, p["lora_B.weight"], p.get("lora_B.bias"), None)


def adalora_forward(
    kern: Kernels, ops: object, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor
) -> Any:
    """AdaLoRA on a linear layer: W x + b + s·P ((Q x) ⊙ Λ), Λ (masked) as the shrink kernel's per-rank scale."""
    from peftdecl_torch.kinds.adalora import singular_values

    q = p["lora_A"]
    if not fused.fusable(lp, layer, x, q.dtype, lp.options["dropout"], half_compute=True):
        return NotImplemented
    return _linear(kern, lp, layer, x, q, p["lora_B"], None, singular_values(lp, p).reshape(-1))


def dora_weight_norm(
    kern: Kernels,
    lp: LayerPlan,
    layer: AdaptedLayer,
    p: Params,
    weight_sq: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> Any:
    """DoRA's n = ‖W + s·B A‖ per output row of a linear layer from the factored sum (two shrinks and the norm
    kernel; ‖W‖² is summed again by its kernel, ``weight_sq`` unused), without gradient."""
    from peftdecl.plan.kinds.dora import MAGNITUDE

    if lp.layer.type != "linear" or "lora_A.weight" not in p:
        return NotImplemented
    m, a, b = p[MAGNITUDE], p["lora_A.weight"], p["lora_B.weight"]
    w = layer.weight_ir() if weight is None else weight
    if (
        not on_device(w, a, b, m)
        or w.dtype not in kern.dtypes
        or len({w.dtype, a.dtype, b.dtype, m.dtype}) != 1
        or not w.is_contiguous()
        or a.shape[0] == 0
    ):
        return NotImplemented
    with torch.no_grad():
        return kern.dora_norm(w.detach(), a.detach(), b.detach(), float(lp.scaling)).to(m.dtype)


class DoraLowRank(torch.autograd.Function):
    """DoRA's y = b + g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ), g = m / n (n > 0, without gradient) for a frozen W, one dtype: x Wᵀ
    + b by torch's GEMM, u = x Aᵀ by the shrink kernel, then D = y − b + s·u Bᵀ and g ⊙ D + b in one output pass.

    Backward from D (kept, as the torch path keeps y): dm = Σ_t dy ⊙ D / n; with dy' = dy ⊙ g, du = s·dy' B
    (a shrink), dx = dy' W + du A (a GEMM, then an expand into it), dA = duᵀ x and dB = s·dy'ᵀ u (the outer
    kernel)."""

    @staticmethod
    def forward(
        ctx: _Ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        m: torch.Tensor,
        n: torch.Tensor,
        scaling: float,
        kern: Kernels,
    ) -> torch.Tensor:
        x2 = _rows(x)
        y = F.linear(x2, weight, bias).contiguous()
        u = kern.shrink(x2, a, 1.0, None)
        out, direction = kern.dora_output(u, b, y, bias, m.reshape(-1), n, scaling)
        ctx.save_for_backward(x2, weight, a, b, m, n, u, direction)
        ctx.kern, ctx.scaling, ctx.shape = kern, scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: _Ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, a, b, m, n, u, direction = ctx.saved_tensors
        kern, s = ctx.kern, ctx.scaling
        need_x, _, _, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        dy2 = _rows(dy)
        dx = da = db = dm = None
        if need_m:
            dm = ((dy2 * direction).sum(0) / n).reshape(m.shape).to(m.dtype)
        dyg = (dy2 * (m.reshape(-1) / n)).to(dy2.dtype).contiguous()  # dy ⊙ g
        if need_x or need_a:
            du = kern.shrink(dyg, b.t(), s, None)  # s · (dy ⊙ g) B
            if need_x:
                dx = torch.mm(dyg, weight)
                kern.expand(du, a.t(), dx, 1.0)
                dx = dx.view(ctx.shape)
            if need_a:
                da = kern.outer(du, x2, torch.empty_like(a), 1.0)
        if need_b:
            db = torch.empty_like(b)
            kern.outer(u, dyg, db.t(), s)
        return dx, None, None, da, db, dm, None, None, None


def dora_forward(
    kern: Kernels, ops: object, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor
) -> Any:
    """DoRA on a linear layer in one dtype, where folding g ⊙ (W + s·B A) into a weight copy (the torch path's
    form) does not pay: :class:`DoraLowRank`, n from :func:`dora_weight_norm`; rows with n = 0 take the torch
    path (g = 1 there)."""
    from peftdecl.plan.kinds.dora import MAGNITUDE
    from peftdecl_torch.kinds.dora import _weight_sq, weight_norm

    if "lora_A.weight" not in p or lp.layer.type != "linear":
        return NotImplemented
    m, a, b = p[MAGNITUDE], p["lora_A.weight"], p["lora_B.weight"]
    weight, bias = layer.base_weight, layer.bias
    if (
        not fused.fusable(lp, layer, x, m.dtype, lp.options["dropout"])  # one dtype: x, W, m
        or fused.merge_pays(lp, layer, x)
        or x.dtype not in kern.dtypes
        or a.dtype != x.dtype
        or b.dtype != x.dtype
        or (bias is not None and bias.dtype != x.dtype)
        or not on_device(x, weight, bias, a, b, m)
        or x.numel() == 0
    ):
        return NotImplemented
    n = weight_norm(lp, layer, p, _weight_sq(lp, layer, p))
    if n.dtype != accumulation(x.dtype) or not bool((n > 0).all()):
        return NotImplemented
    y: torch.Tensor = DoraLowRank.apply(x, weight, bias, a, b, m, n, float(lp.scaling), kern)
    return y
