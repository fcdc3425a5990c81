"""Autograd Functions over the CuPy kernels: the forward and backward passes route tensors to a kernel object.

Every Function takes the kernel object as its last input (:class:`Kernels`: :class:`peftdecl_torch.cuda_bridge.
CupyKernels` on CUDA tensors, a torch double in the dispatch tests), so the wiring here (what is saved, which
kernel computes which gradient, shapes) is checked on the CPU with ``torch.autograd.gradcheck`` in float64.
Activations reach the kernels as 2-D row-major tensors; each kernel returns new tensors (or writes in place where
it says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from peftdecl_torch.kinds._fused import FunctionContext


class Kernels(Protocol):
    """The kernel entry points, on torch tensors (the math of each is in ``backends/peftdecl_cupy/kernels``)."""

    dtypes: frozenset[torch.dtype]
    """Activation dtypes with entry points."""
    param_dtypes: frozenset[torch.dtype]
    """dtypes of rotations, scales and VeRA factors."""
    max_block: int
    """Widest rotation block the rotation kernels take."""
    max_rank: int
    """Largest LoHa rank the delta kernel takes."""
    max_gather_rank: int
    """Largest adapter rank the gathered (decode) mixed-batch kernels take."""

    def rotate(self, x: torch.Tensor, r: torch.Tensor, transpose: bool) -> torch.Tensor: ...
    def rotate_tn(self, x: torch.Tensor, g: torch.Tensor, b: int) -> torch.Tensor: ...
    def butterfly_factor(
        self, x: torch.Tensor, q: torch.Tensor, idx: torch.Tensor | None, transpose: bool
    ) -> torch.Tensor: ...
    def butterfly_factor_tn(
        self, x: torch.Tensor, g: torch.Tensor, idx: torch.Tensor | None, b: int
    ) -> torch.Tensor: ...
    def skew_solve(self, s: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor: ...
    def neumann(self, q: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor: ...
    def scale_columns(self, y: torch.Tensor, scale: torch.Tensor, in_place: bool) -> torch.Tensor: ...
    def scale_columns_backward(
        self, dy: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def lowrank_add(
        self,
        out: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor,
        sm: torch.Tensor | None,
        sn: torch.Tensor | None,
        sk: torch.Tensor | None,
    ) -> torch.Tensor: ...
    def loha_delta(
        self, a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, scale: float
    ) -> torch.Tensor: ...
    def loha_backward(
        self,
        g: torch.Tensor,
        a1: torch.Tensor,
        b1: torch.Tensor,
        a2: torch.Tensor,
        b2: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def kron_delta(self, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor: ...
    def kron_backward(
        self, g: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def nf4_dequant(
        self,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        table: torch.Tensor,
        blocksize: int,
        out: torch.Tensor,
    ) -> torch.Tensor: ...
    def nf4_lowrank(
        self,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        table: torch.Tensor,
        blocksize: int,
        b: torch.Tensor,
        a: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> torch.Tensor: ...
    def absmax_dequant(
        self, q: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, offset: float, blocksize: int
    ) -> torch.Tensor: ...
    # mixed_batch.cu: Y[t] += s_i (X[t] A_iᵀ) B_iᵀ in place for i = index[t] >= 0; X [T, K] and Y [T, N]
    # contiguous, A_i [r_i, K] and B_i [N, r_i] in X's dtype, ``index`` a host int32 array of T entries
    def mixed(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
        index: np.ndarray,
    ) -> torch.Tensor: ...
    # the low-rank kernels (lora.cu, dora.cu): U and the norms in the accumulation type (float32 for bfloat16)
    def shrink(
        self, x: torch.Tensor, a: torch.Tensor, alpha: float, rank_scale: torch.Tensor | None
    ) -> torch.Tensor: ...
    def expand(self, u: torch.Tensor, b: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor: ...
    def outer(self, u: torch.Tensor, x: torch.Tensor, out: torch.Tensor, alpha: float) -> torch.Tensor: ...
    def dora_norm(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor: ...
    def dora_output(
        self,
        u: torch.Tensor,
        b: torch.Tensor,
        y: torch.Tensor,
        bias: torch.Tensor | None,
        m: torch.Tensor,
        n: torch.Tensor,
        s: float,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class _Ctx(FunctionContext, Protocol):
    kern: Kernels
    merged: bool
    shape: torch.Size
    scale: float
    idx: list[torch.Tensor | None]
    coefficients: tuple[float, ...]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


class RotateBlocks(torch.autograd.Function):
    """y = x · blockdiag(R_1..R_n) for x [..., n·b], R [n, b, b]; dx = dy · blockdiag(R_iᵀ), dR_i = Σ_t x_iᵀ dy_i."""

    @staticmethod
    def forward(ctx: _Ctx, x: torch.Tensor, r: torch.Tensor, kern: Kernels) -> torch.Tensor:
        x2, rc = _rows(x), r.contiguous()
        ctx.save_for_backward(x2, rc)
        ctx.kern, ctx.shape = kern, x.shape
        return kern.rotate(x2, rc, False).view(x.shape)

    @staticmethod
    def backward(ctx: _Ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, r = ctx.saved_tensors
        dy2 = _rows(dy)
        dx = ctx.kern.rotate(dy2, r, True).view(ctx.shape) if ctx.needs_input_grad[0] else None
        dr = ctx.kern.rotate_tn(x2, dy2, r.shape[-1]).to(r.dtype) if ctx.needs_input_grad[1] else None
        return dx, dr, None


class Butterfly(torch.autograd.Function):
    """x M for M = B_{N−1} ⋯ B_0, B_i = P_i blockdiag(Q_i) P_iᵀ, one kernel pass per factor (``idx[i]`` = p_i⁻¹ as
    int32, None for the identity); the backward pass runs the factors in reverse with Q_iᵀ, and dQ_i from each
    factor's saved input."""

    @staticmethod
    def forward(
        ctx: _Ctx, x: torch.Tensor, q: torch.Tensor, idx: list[torch.Tensor | None], kern: Kernels
    ) -> torch.Tensor:
        qc = q.contiguous()
        current = _rows(x)
        inputs: list[torch.Tensor] = [current] * len(idx)
        for i in reversed(range(len(idx))):
            inputs[i] = current
            current = kern.butterfly_factor(current, qc[i], idx[i], False)
        ctx.save_for_backward(qc, *inputs)
        ctx.kern, ctx.shape, ctx.idx = kern, x.shape, idx
        return current.view(x.shape)

    @staticmethod
    def backward(ctx: _Ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, *inputs = ctx.saved_tensors
        kern, b = ctx.kern, q.shape[-1]
        grad = _rows(dy)
        dq = []
        for i in range(len(ctx.idx)):
            if ctx.needs_input_grad[1]:
                dq.append(kern.butterfly_factor_tn(inputs[i], grad, ctx.idx[i], b).to(q.dtype))
            grad = kern.butterfly_factor(grad, q[i], ctx.idx[i], True)
        dx = grad.view(ctx.shape) if ctx.needs_input_grad[0] else None
        return dx, torch.stack(dq) if dq else None, None, None


def _eye_like(s: torch.Tensor) -> torch.Tensor:
    return torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)


class Cayley(torch.autograd.Function):
    """R = (I + S)⁻¹(I − S) = (I − S)(I + S)⁻¹ per block (one batched solve kernel, S skew-symmetric); backward
    dS = −(I + R)ᵀ G (I + S)⁻ᵀ = −[(I + S)⁻¹ ((I + R)ᵀ G)ᵀ]ᵀ, the same kernel."""

    @staticmethod
    def forward(ctx: _Ctx, s: torch.Tensor, kern: Kernels) -> torch.Tensor:
        flat = s.reshape(-1, *s.shape[-2:]).contiguous()
        r = kern.skew_solve(flat, (_eye_like(flat) - flat).contiguous())
        ctx.save_for_backward(flat, r)
        ctx.kern, ctx.shape = kern, s.shape
        return r.view(s.shape)

    @staticmethod
    def backward(ctx: _Ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        s, r = ctx.saved_tensors
        g = grad.reshape(s.shape)
        left = (_eye_like(r) + r).transpose(1, 2) @ g
        ds = -ctx.kern.skew_solve(s, left.transpose(1, 2).contiguous()).transpose(1, 2)
        return ds.reshape(ctx.shape), None


class Neumann(torch.autograd.Function):
    """R = Σ_k c_k Q^k per block (one kernel, powers on chip); backward dQ = Σ_k c_k Σ_{j<k} (Q^j)ᵀ G (Q^{k−1−j})ᵀ
    with batched products of the small blocks."""

    @staticmethod
    def forward(ctx: _Ctx, q: torch.Tensor, coefficients: tuple[float, ...], kern: Kernels) -> torch.Tensor:
        flat = q.reshape(-1, *q.shape[-2:]).contiguous()
        ctx.save_for_backward(flat)
        ctx.shape, ctx.coefficients = q.shape, coefficients
        return kern.neumann(flat, coefficients).view(q.shape)

    @staticmethod
    def backward(ctx: _Ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (q,) = ctx.saved_tensors
        g = grad.reshape(q.shape)
        powers_t = [_eye_like(q)]
        for _ in range(len(ctx.coefficients) - 2):
            powers_t.append(powers_t[-1] @ q.transpose(1, 2))  # (Q^j)ᵀ = (Qᵀ)^j
        dq = torch.zeros_like(q)
        for k, c in enumerate(ctx.coefficients):
            for j in range(k):
                dq = dq + c * (powers_t[j] @ g @ powers_t[k - 1 - j])
        return dq.reshape(ctx.shape), None, None


class ScaleColumns(torch.autograd.Function):
    """y ⊙ l over the last axis (IA3), in y's dtype; backward dy ⊙ l and dl = Σ_t dy ⊙ y in one pass over dy."""

    @staticmethod
    def forward(ctx: _Ctx, y: torch.Tensor, scale: torch.Tensor, kern: Kernels) -> torch.Tensor:
        y2 = _rows(y)
        ctx.save_for_backward(y2, scale)
        ctx.kern, ctx.shape = kern, y.shape
        return kern.scale_columns(y2, scale, False).view(y.shape)

    @staticmethod
    def backward(ctx: _Ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y2, scale = ctx.saved_tensors
        dy_scaled, dl = ctx.kern.scale_columns_backward(_rows(dy), y2, scale)
        return dy_scaled.view(ctx.shape), dl.to(scale.dtype), None


class VeraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + (λ_d ⊙ x Aᵀ)(λ_b ⊙ B)ᵀ for a frozen W, A, B, u = x Aᵀ by the GEMM, in one of two forms:
    token-side, the scaled expand added to y in one kernel pass; ``merged`` (many tokens), one GEMM with
    W' = W + diag(λ_b) B diag(λ_d) A built by the same kernel in one pass over W (kept for dx).
    Backward: dx = dy W' = dy W + ((dy (λ_b ⊙ B)) ⊙ λ_d) A; with M = dyᵀ u, dλ_b = Σ_r B ⊙ λ_d ⊙ M,
    dλ_d = Σ_o λ_b ⊙ B ⊙ M."""

    @staticmethod
    def forward(
        ctx: _Ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        lam_d: torch.Tensor,
        lam_b: torch.Tensor,
        merged: bool,
        kern: Kernels,
    ) -> torch.Tensor:
        x2 = _rows(x)
        u = torch.nn.functional.linear(x2, a.to(x.dtype)).to(a.dtype).contiguous()  # [T, r]
        if merged:
            weight = kern.lowrank_add(
                weight.clone(memory_format=torch.contiguous_format), b, a, lam_b, None, lam_d
            )
            y = torch.nn.functional.linear(x2, weight, bias)
        else:
            y = torch.nn.functional.linear(x2, weight, bias).contiguous()
            kern.lowrank_add(y, u, b.t(), None, lam_b, lam_d)  # y += (u ⊙ λ_d) (Bᵀ ⊙ λ_b), in place
        ctx.save_for_backward(u, weight, a, b, lam_d, lam_b)
        ctx.shape, ctx.merged = x.shape, merged
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: _Ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, weight, a, b, lam_d, lam_b = ctx.saved_tensors
        dy2 = _rows(dy)
        need_x, need_d, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[5], ctx.needs_input_grad[6]
        dx = d_lam_d = d_lam_b = None
        if need_x and ctx.merged:
            dx = (dy2 @ weight).view(ctx.shape)  # weight is W'
        elif need_x:
            gh = (dy2 @ (b * lam_b[:, None]).to(dy.dtype)).to(lam_d.dtype) * lam_d  # [T, r]
            dx = torch.addmm(dy2 @ weight, gh.to(dy.dtype), a.to(dy.dtype)).view(ctx.shape)
        if need_d or need_b:
            m = (dy2.t() @ u.to(dy.dtype)).to(b.dtype) * b  # (dyᵀ u) ⊙ B, [out, r]
            d_lam_b = (m * lam_d).sum(1) if need_b else None
            d_lam_d = (m * lam_b[:, None]).sum(0) if need_d else None
        return dx, None, None, None, None, d_lam_d, d_lam_b, None, None


class LohaDelta(torch.autograd.Function):
    """ΔW = s · (a1 b1) ⊙ (a2 b2) in one kernel; backward dp_i from the kernel, then dA = dp Bᵀ, dB = Aᵀ dp."""

    @staticmethod
    def forward(
        ctx: _Ctx,
        a1: torch.Tensor,
        b1: torch.Tensor,
        a2: torch.Tensor,
        b2: torch.Tensor,
        scale: float,
        kern: Kernels,
    ) -> torch.Tensor:
        a1, b1, a2, b2 = (t.contiguous() for t in (a1, b1, a2, b2))
        ctx.save_for_backward(a1, b1, a2, b2)
        ctx.kern, ctx.scale = kern, scale
        return kern.loha_delta(a1, b1, a2, b2, scale)

    @staticmethod
    def backward(ctx: _Ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a1, b1, a2, b2 = ctx.saved_tensors
        dp1, dp2 = ctx.kern.loha_backward(g.contiguous(), a1, b1, a2, b2, ctx.scale)
        return dp1 @ b1.t(), a1.t() @ dp1, dp2 @ b2.t(), a2.t() @ dp2, None, None


class KronDelta(torch.autograd.Function):
    """ΔW = s · kron(w1, w2) for matrices, in one kernel, and its backward (two reductions)."""

    @staticmethod
    def forward(ctx: _Ctx, w1: torch.Tensor, w2: torch.Tensor, scale: float, kern: Kernels) -> torch.Tensor:
        w1c, w2c = w1.contiguous(), w2.contiguous()
        ctx.save_for_backward(w1c, w2c)
        ctx.kern, ctx.scale = kern, scale
        return kern.kron_delta(w1c, w2c, scale)

    @staticmethod
    def backward(ctx: _Ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1, w2 = ctx.saved_tensors
        dw1, dw2 = ctx.kern.kron_backward(g.contiguous(), w1, w2, ctx.scale)
        return dw1, dw2, None, None


def apply(function: type[torch.autograd.Function], *args: Any) -> torch.Tensor:
    """``function.apply(*args)`` typed (torch's stubs return Any)."""
    out: torch.Tensor = function.apply(*args)
    return out
