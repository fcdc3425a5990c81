"""DoRA (Liu et al., 2024) on torch: y = g ⊙ (W x + s·B A x) + b, g = m / n, n = ‖W + s·B A‖_row (detached).

n comes from the factored sum ‖W‖² + 2s·⟨B, W Aᵀ⟩ + s²·⟨B, B (A Aᵀ)⟩ per row (never B·A; ‖W‖² is cached while the
base weight is unchanged; a grouped conv takes HF PEFT's norm, formed densely, and cannot merge). Rows with n = 0
use g = 1 (the NumPy reference's rule). With dropout in training the base term is recomputed on the dropped input
h: y = W x + b + (g − 1) ⊙ W h + g ⊙ s·B A h. Merge: W' = g ⊙ (W + ΔW)
with n cached for unmerge, W = W' / g − ΔW; n is taken on the weight without earlier merged adapters, as in HF
PEFT. With other adapters on the layer, g rescales the output they built (:meth:`DoraOps.compose_output`).
On a half-precision base the float32 adapter runs in the base dtype (:class:`DoraLinearFunction`, see _fused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.errors import BackendError, PeftdeclError
from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.dora import MAGNITUDE
from peftdecl_torch import cuda_kernels
from peftdecl_torch.kinds import _fused as fused
from peftdecl_torch.kinds.lora import OPS as LORA
from peftdecl_torch.kinds.lora import _add_expand, _conv, _ones

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


Params = dict[str, torch.Tensor]


def _factors(
    lp: LayerPlan,
    layer: AdaptedLayer,
    p: Params,
    dtype: torch.dtype | None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """2-D (W, A, B) whose rows are the directions DoRA normalises (an embedding's rows are its dimensions);
    W is the layer's current weight unless ``weight`` (IR layout) is given, cast to ``dtype`` unless None."""
    weight = (layer.weight_ir() if weight is None else weight).detach()
    weight = weight if dtype is None else weight.to(dtype)
    if lp.layer.type == "embedding":
        return weight.t(), p["lora_embedding_A"].detach(), p["lora_embedding_B"].detach()
    a, b = p["lora_A.weight"].detach(), p["lora_B.weight"].detach()
    return weight.reshape(weight.shape[0], -1), a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


@cuda_kernels.replaces("dora_weight_norm")
def weight_norm(
    lp: LayerPlan,
    layer: AdaptedLayer,
    p: Params,
    weight_sq: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """n = ‖W + s·B A‖ per direction row (W: the current weight, or ``weight``), without forming B A and without
    gradient."""
    with torch.no_grad():
        dtype = p[MAGNITUDE].dtype
        if lp.layer.is_conv and lp.layer.groups > 1:
            return _grouped_norm(lp, layer, p, weight)
        w, a, b = _factors(lp, layer, p, None, weight)
        if weight_sq is None:
            weight_sq = torch.einsum("oi,oi->o", w.to(dtype), w.to(dtype))
        s = lp.scaling
        # W Aᵀ in the base weight's dtype: no float32 copy of a half-precision W per call
        cross = torch.einsum("or,or->o", b, torch.mm(w, a.t().to(w.dtype)).to(dtype))
        quad = torch.einsum("or,or->o", b, b @ (a @ a.t()))
        return (weight_sq + 2.0 * s * cross + s * s * quad).clamp_min(0.0).sqrt()


def _grouped_norm(lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: torch.Tensor | None) -> torch.Tensor:
    """HF PEFT's norm on a grouped conv: ‖W + s·L‖_row with L = (B as [−1, r]) (A as [r, −1]) laid out as W (see
    ``peftdecl.plan.kinds.dora.grouped_norm_direction``), formed densely: L is no larger than W."""
    dtype = p[MAGNITUDE].dtype
    w = (layer.weight_ir() if weight is None else weight).detach().to(dtype)
    a, b = p["lora_A.weight"].detach(), p["lora_B.weight"].detach()
    r, rows = a.shape[0], w.shape[0]
    direction = w.reshape(rows, -1) + lp.scaling * (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(rows, -1)
    norm: torch.Tensor = torch.linalg.vector_norm(direction, dim=1)
    return norm


def _weight_sq(lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
    # ‖W‖² per row changes only when the base weight does (a merge, or a user edit: both bump its version)
    weight = layer.base_weight
    key = (weight.data_ptr(), weight._version, p[MAGNITUDE].dtype, lp.layer.type)
    cached = layer.scratch.setdefault("dora_weight_sq", {})
    if key not in cached:
        cached.clear()
        with torch.no_grad():
            w = _factors(lp, layer, p, p[MAGNITUDE].dtype)[0]
            cached[key] = torch.einsum("oi,oi->o", w, w)
    found: torch.Tensor = cached[key]
    return found


def magnitude_scale(m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """g = m / n per row, 1 where n = 0 (no gradient reaches m there)."""
    m = m.reshape(-1)
    nonzero = n > 0
    return torch.where(nonzero, m / torch.where(nonzero, n, torch.ones_like(n)), torch.ones_like(m))


def _along_out(lp: LayerPlan, g: torch.Tensor, ndim: int) -> torch.Tensor:
    return g.reshape(1, -1, *(1,) * (ndim - 2)) if lp.layer.is_conv else g


class DoraContext(fused.ScaledContext, Protocol):
    """The ctx of :class:`DoraLinearFunction`: which of its two forms ran."""

    half: bool


class DoraLinearFunction(torch.autograd.Function):
    """y = g ⊙ (x (W + s·B A)ᵀ) + b for a frozen W (g = m / n; n an input without gradient, detached as in DoRA).

    One dtype throughout: one matmul with the merged weight W' = g ⊙ (W + s·B A). Backward keeps x and y only:
    g ⊙ z = y − b recovers the direction term z (so every m must be non-zero), and W' is rebuilt for dL/dx
    instead of being stored.

    A half-precision base (A, B cast to it, m and n float32): the update is applied per token, not merged into W
    (W + s·B A rounded to half precision would blur a small update), and the forward keeps what LoRA's does: y and
    u = x Aᵀ. The backward runs through token-row slices so its scratch has a fixed size: Σ_t dy ⊙ (y − b) / m for
    dL/dm, and (dy ⊙ g) W + s·((dy ⊙ g) B) A for dL/dx.
    """

    @staticmethod
    def forward(
        ctx: DoraContext,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        m: torch.Tensor,
        n: torch.Tensor,
        scaling: float,
        stored_in_out: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        w = fused.weight_ir(weight, stored_in_out)
        ctx.scaling, ctx.stored_in_out, ctx.half = scaling, stored_in_out, x.dtype != m.dtype
        if not ctx.half:
            y = fused.linear(x2, _merged(w, a, b, m, n, scaling), bias)
            ctx.save_for_backward(x, y, weight, bias, a, b, m, n)
        else:
            u = torch.mm(x2, a.t())
            y = torch.mm(x2, w.t())
            y.addmm_(u, b.t(), alpha=scaling)
            y.mul_(m.reshape(-1) / n)  # a float32 g on a half y: computed in float32, rounded once
            if bias is not None:
                y.add_(bias)
            ctx.save_for_backward(x, y, weight, bias, a, b, m, n, u)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: DoraContext, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept = ctx.saved_tensors  # read once: non-reentrant activation checkpointing unpacks on each read
        x, y, weight = kept[:3]
        bias: torch.Tensor | None = kept[3]  # None on a layer without a bias
        a, b, m, n = kept[4:8]
        u = kept[8] if ctx.half else None
        need_x, _, _, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        w = fused.weight_ir(weight, ctx.stored_in_out)
        dy2, x2, g = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), m.reshape(-1) / n
        saved = Saved(dy2, x2, y, u, w, bias, a, b, m, n, g, ctx.scaling, need_x, need_a, need_b, need_m)
        dx, da, db, dm = _half_grads(saved) if ctx.half else _merged_grads(saved)
        return None if dx is None else dx.view(x.shape), None, None, da, db, dm, None, None, None


class Saved(NamedTuple):
    """What the backward of either form reads: rows of dy and x, the saved y (and u = x Aᵀ, half form only), W in
    the IR layout, the inputs, g = m / n, s and which gradients are needed."""

    dy2: torch.Tensor
    x2: torch.Tensor
    y: torch.Tensor
    u: torch.Tensor | None
    w: torch.Tensor
    bias: torch.Tensor | None
    a: torch.Tensor
    b: torch.Tensor
    m: torch.Tensor
    n: torch.Tensor
    g: torch.Tensor
    s: float
    need_x: bool
    need_a: bool
    need_b: bool
    need_m: bool


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
"""(dL/dx [T, in], dL/dA, dL/dB, dL/dm), None where not needed."""


def _merged_grads(v: Saved) -> Grads:
    """The one-dtype form's gradients: x, y and the rebuilt W' only."""
    dy2, x2, y, m, g, s = v.dy2, v.x2, v.y, v.m, v.g, v.s
    dx = da = db = dm = scratch = None
    if v.need_m:  # dL/dm = Σ_t dy ⊙ z / n with z = (y − b) / g, i.e. Σ_t dy ⊙ (y − b) / m
        # sums over tokens as products with a ones vector: a CUDA reduction over dim 0 stages partial sums in
        # a workspace twice the size of its input; the product buffer is reused for dL/dx below
        ones = dy2.new_ones(dy2.shape[0])
        scratch = torch.mul(dy2, y)
        dot = torch.mv(scratch.t(), ones)
        if v.bias is not None:
            dot = dot - v.bias * torch.mv(dy2.t(), ones)
        dm = (dot / m.reshape(-1)).reshape(m.shape)
    if v.need_x:
        merged = _merged(v.w, v.a, v.b, m, v.n, s)
        reuse = scratch is not None and scratch.shape == (dy2.shape[0], merged.shape[1])
        dx = torch.mm(dy2, merged, out=scratch) if reuse else torch.mm(dy2, merged)
    if v.need_a:
        da = (torch.mm(dy2, v.b * g[:, None]).t() @ x2).mul_(s)  # s · ((dy ⊙ g) B)ᵀ x
    if v.need_b:
        db = (torch.mm(x2, v.a.t()).t() @ dy2).t().mul_(s * g[:, None])  # s · (dy ⊙ g)ᵀ (x Aᵀ)
    return dx, da, db, dm


ROW_SLICE_ELEMENTS = 1 << 22
"""Elements of one token-row slice in the half-precision form's backward: its fixed-size scratch."""


def _half_grads(v: Saved) -> Grads:
    """The half-precision form's gradients, through token-row slices (:func:`_row_slices`) and the kept u."""
    dy2, m, g, s = v.dy2, v.m, v.g, v.s
    dx = da = db = dm = None
    if v.need_a or v.need_x:
        dyg_b = torch.mm(dy2, (v.b * g[:, None]).to(v.b.dtype))  # (dy ⊙ g) B, [T, r]
        if v.need_a:
            da = torch.mm(dyg_b.t(), v.x2).mul_(s)
    if v.need_b:
        assert v.u is not None  # the half form keeps u
        db = torch.mm(v.u.t(), dy2).t().mul_(g[:, None] * s)  # s · (dy ⊙ g)ᵀ u
    if v.need_x or v.need_m:
        dx, dot = _row_slices(dy2, v.y, v.x2, v.w, g, v.need_x, v.need_m)
        if dx is not None:  # need_x
            dx.addmm_(dyg_b, v.a, alpha=s)
        if dot is not None:  # need_m
            if v.bias is not None:
                ones = dy2.new_ones(dy2.shape[0])
                dot = dot - v.bias.to(dot.dtype) * torch.mv(dy2.t(), ones).to(dot.dtype)
            dm = (dot / m.reshape(-1)).reshape(m.shape)
    return dx, da, db, dm


def _row_slices(
    dy2: torch.Tensor,
    y: torch.Tensor,
    x2: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    need_x: bool,
    need_m: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """((dy ⊙ g) W, Σ_t dy ⊙ y in float32), slice by slice of token rows through one fixed-size scratch; None for
    a part that is not ``need_x`` / ``need_m``."""
    tokens, d_out = dy2.shape
    rows = max(1, ROW_SLICE_ELEMENTS // max(d_out, 1))
    scratch = dy2.new_empty(min(rows, tokens), d_out)
    ones = dy2.new_ones(scratch.shape[0])
    dx = dy2.new_empty(tokens, x2.shape[1]) if need_x else None
    dot = torch.zeros(d_out, dtype=g.dtype, device=g.device) if need_m else None
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        buf = scratch[: stop - start]
        if dot is not None:
            torch.mul(dy2[start:stop], y[start:stop], out=buf)
            dot += torch.mv(buf.t(), ones[: stop - start])
        if dx is not None:
            torch.mul(dy2[start:stop], g, out=buf)
            torch.mm(buf, w, out=dx[start:stop])
    return dx, dot


def _merged(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, n: torch.Tensor, scaling: float
) -> torch.Tensor:
    """g ⊙ (W + s·B A), the only place B A is formed (transiently, for the one matmul)."""
    return torch.addmm(w, b, a, alpha=scaling).mul_((m.reshape(-1) / n)[:, None])


class DoraOps:
    """DoRA's :class:`peftdecl.backend.ComposingOps` (OUTPUT): g rescales the output built so far."""

    kind = "dora"
    additive = False
    input_order = (
        "active"  # unused: DoRA composes on the output (the Protocol asks every composing kind for it)
    )
    merge_reads_unmerged = True  # n is taken on the weight before earlier merges (AdaptedLayer keeps it)

    @cuda_kernels.replaces("dora_forward")
    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        dtype = p[MAGNITUDE].dtype
        s = lp.scaling
        n = weight_norm(lp, layer, p, _weight_sq(lp, layer, p))
        m = p[MAGNITUDE]
        dropout = lp.options["dropout"]
        if fused.fusable(lp, layer, x, dtype, dropout, half_compute=True) and bool(
            (n > 0).all() & (m != 0).all()
        ):
            a, b = fused.compute_dtype(x, p["lora_A.weight"], p["lora_B.weight"])
            y: torch.Tensor = DoraLinearFunction.apply(
                x, layer.base_weight, layer.bias, a, b, m, n, s, lp.layer.type == "gpt2_conv1d"
            )
            return y
        base_out = layer.base_forward(x)
        return self._compose(lp, layer, p, x, base_out.to(dtype), n).to(base_out.dtype)

    composition = staticmethod(compositions.dora)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """b + g ⊙ (y − b) + g ⊙ s·B A x for the output so far y (in the adapter dtype); embeddings
        g ⊙ (y + s·B A x); with dropout in training y + (g − 1) ⊙ W h + g ⊙ s·B A h."""
        return self._compose(lp, layer, p, x, y, None)

    def compose_weight(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: torch.Tensor
    ) -> torch.Tensor:
        raise BackendError(f"{lp.module}: DoRA composes on the layer output, not on its weight")

    def _compose(
        self,
        lp: LayerPlan,
        layer: AdaptedLayer,
        p: Params,
        x: torch.Tensor,
        result: torch.Tensor,
        n: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype, s = p[MAGNITUDE].dtype, lp.scaling
        if n is None:
            n = weight_norm(lp, layer, p, _weight_sq(lp, layer, p))
        g = magnitude_scale(p[MAGNITUDE], n)
        if lp.layer.type == "embedding":
            u = layer.embed(x, p["lora_embedding_A"].t())
            return g * _add_expand(result, u, p["lora_embedding_B"], s)
        xa = x.to(dtype)
        rate = lp.options["dropout"]
        dropped = layer.training and rate > 0
        h = layer.dropout(xa, rate)
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if lp.layer.is_conv:
            k = a.ndim - 2
            u = _conv(h, a, None, lp.layer.stride, lp.layer.padding)
            v = _conv(u, b, None, _ones(k), (0,) * k, lp.layer.groups)
        else:
            v = None
        gb = _along_out(lp, g, result.ndim)
        if dropped:
            wh = layer.functional(h, layer.weight_ir().to(dtype), None)
            low = v if v is not None else F.linear(F.linear(h, a), b)
            return result + (gb - 1.0) * wh + gb * s * low
        bias = layer.bias
        bias = None if bias is None else bias.to(dtype).reshape(gb.shape[1:] if lp.layer.is_conv else (-1,))
        plain = result if bias is None else result - bias
        direction = plain + s * v if v is not None else _add_expand(plain, F.linear(h, a), b, s)
        return gb * direction if bias is None else gb * direction + bias

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        """The change merging makes to the current base weight: g ⊙ (W + ΔW) − W."""
        return self._merged(lp, layer, p)[0] - layer.weight_ir()

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # n on the weight without the adapters merged before (the one forward reads), as in HF PEFT
        merged, n = self._merged(lp, layer, p, layer.unmerged_weight_ir())
        cache["n"] = n  # n cannot be recovered from the merged weight, whose rows have norm |m|
        return merged, None

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "n" not in cache:
            raise PeftdeclError(f"{lp.module}: DoRA unmerge without a matching merge (no cached weight norm)")
        g = magnitude_scale(p[MAGNITUDE], cache["n"])
        if bool((g == 0).any()):
            raise PeftdeclError(f"{lp.module}: cannot unmerge DoRA, lora_magnitude_vector is 0 in some rows")
        weight = layer.weight_ir()
        restored = weight.to(g.dtype) / self._rows(lp, g) - LORA.delta_weight(lp, layer, p)
        return restored.to(weight.dtype), None

    def _merged(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, norm_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = weight_norm(lp, layer, p, weight=norm_weight)
        g = magnitude_scale(p[MAGNITUDE], n)
        weight = layer.weight_ir()
        merged = self._rows(lp, g) * (weight.to(g.dtype) + LORA.delta_weight(lp, layer, p))
        return merged.to(weight.dtype), n

    @staticmethod
    def _rows(lp: LayerPlan, g: torch.Tensor) -> torch.Tensor:
        if lp.layer.type == "embedding":
            return g[None, :]
        return g.reshape(-1, *(1,) * (len(lp.layer.weight_shape) - 1))


OPS = DoraOps()
