"""LoRA and DoRA on a linear layer as single MLX functions with hand-written gradients (``mx.custom_function``).

Used when one adapter runs alone with no dropout, every array has the adapter dtype and the engine option ``fused``
is on (:class:`peftdecl.options.EngineOptions`). Autograd through the plain formulas is correct but pays for things
these avoid: it multiplies by s on token-sized arrays (forward and backward) where s can sit once on an r × in
factor, it adds the low-rank output in a separate pass where ``addmm`` folds it into the product, and some of its
products read an operand transposed with a long inner dimension, which MLX's CPU BLAS runs more slowly (every
product here reads its right operand row-contiguous or has an inner dimension of r).

Forward, with s·A folded into one [in, r] copy (r·in numbers, whatever the token count):

    LoRA   y = y₀ + (x (s·A)ᵀ) Bᵀ, y₀ the base layer's output; or y = x W′ᵀ + b with W′ = W + s·B A where forming
           W′ costs less than the low-rank products (``merge_pays``); W′ is a temporary, never kept
    DoRA   u = x W′ᵀ where W′ is at hand (just formed for the norm) or pays, else x Wᵀ + (x (s·A)ᵀ) Bᵀ;
           y = g ⊙ u, g = m ⊙ inv + ones (inv, ones: 1/n and the n = 0 rows, held constant)

Backward for a cotangent ȳ (DoRA: ū = g ⊙ ȳ, LoRA: ū = ȳ), with t = x (s·A)ᵀ and q = s·ū B:

    x̄ = ū W + q A,   Ā = qᵀ x,   B̄ = (tᵀ ū)ᵀ,   m̄ = inv ⊙ Σ_tokens ȳ ⊙ u,   W̄ = ūᵀ x, b̄ = Σ_tokens ū

W̄ and b̄ are lazy (computed only if a caller asks for them: the base is usually frozen). The low-rank functions
return t (and DoRA u, g) next to y so that the backward reuses them; the merged ones recompute t. Callers use y
only, so those extra outputs never receive a cotangent.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import cast

import mlx.core as mx

from peftdecl.options import EngineOptions

A = mx.array
LoraMerged = Callable[[A, A, A, A, A], A]
"""f(x, W, b or W, A, B) -> y."""
LoraLowRank = Callable[[A, A, A, A], tuple[A, A]]
"""f(y₀, x, A, B) -> (y, t)."""
DoraFused = Callable[[A, A, A, A, A, A, A, A], tuple[A, A, A, A]]
"""f(x, W, W′ or W, A, B, m, inv, ones) -> (y, u, t, g)."""


def scaled_a(a: mx.array, s: float) -> mx.array:
    """(s·A)ᵀ as a row-contiguous [in, r] array: x @ it reads its right operand in order."""
    return mx.contiguous(a.T) * s


def _rows(t: mx.array) -> mx.array:
    """t as [tokens, features] (a free view of a contiguous array; 2-D arrays pass as they are)."""
    return t if t.ndim == 2 else t.reshape(-1, t.shape[-1])


def _unrows(y: mx.array, x: mx.array) -> mx.array:
    """y [tokens, out] back to x's leading shape."""
    return y if x.ndim == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _low_rank_grads(
    x: mx.array, a: mx.array, b: mx.array, du: mx.array, t: mx.array, s: float
) -> tuple[mx.array, mx.array, mx.array]:
    """(q A, Ā, B̄) for the cotangent ū of u = … + t Bᵀ, t = x (s·A)ᵀ (all 2-D)."""
    q = (du @ b) * s
    return q @ a, q.T @ x, (t.T @ du).T


def merge_pays(x: mx.array, w: mx.array, r: int, training: bool) -> bool:
    """Whether forming W′ = W + s·B A (out·in·r multiply-adds and W copied in: out·in·(r + 1)) costs less than the
    low-rank products and their sum into y (T·(r·(in + out) + out)). In training the merged path's backward
    recomputes x Aᵀ (T·in·r more), which leaves: merge when T > in."""
    d_out, d_in = w.shape
    tokens = x.size // d_in
    merged = d_out * d_in * (r + 1) + (tokens * d_in * r if training else 0)
    return merged < tokens * (r * (d_in + d_out) + d_out)


def use_merged(options: EngineOptions, x: mx.array, w: mx.array, r: int, training: bool) -> bool:
    """Whether to form W′ = W + s·B A for the product x W′ᵀ: the engine option ``fused_merged`` where it is set,
    else :func:`merge_pays` (DoRA also uses a W′ it has just formed for its norm, which costs nothing more)."""
    if options.fused_merged is not None:
        return options.fused_merged
    return merge_pays(x, w, r, training)


@lru_cache(maxsize=64)
def lora_merged(s: float, with_bias: bool) -> LoraMerged:
    """f(x, W, b or W, A, B) -> y = x (W + s·B A)ᵀ (+ b): the base and the adapter in one product, W′ not kept."""

    @mx.custom_function
    def f(x: mx.array, w: mx.array, bias: mx.array, a: mx.array, b: mx.array) -> mx.array:
        wp = mx.addmm(w, b, a, alpha=s)
        x2 = _rows(x)
        return _unrows(mx.addmm(bias, x2, wp.T) if with_bias else x2 @ wp.T, x)

    @f.vjp
    def f_vjp(primals: list[mx.array], cotangent: mx.array, output: mx.array) -> tuple:
        x, w, bias, a, b = primals
        dy, x2 = _rows(cotangent), _rows(x)
        dxq, da, db = _low_rank_grads(x2, a, b, dy, x2 @ scaled_a(a, s), s)
        dx = _unrows(mx.addmm(dxq, dy, w), x)
        # W̄ and b̄ are lazy: nothing computes them unless a caller asks for them (the base is usually frozen)
        dbias = mx.sum(dy, axis=0) if with_bias else mx.zeros_like(bias)
        return dx, dy.T @ x2, dbias, da, db

    return cast(LoraMerged, f)


@lru_cache(maxsize=64)
def lora(s: float) -> LoraLowRank:
    """f(y₀, x, A, B) -> (y, t): y = y₀ + t Bᵀ with t = x (s·A)ᵀ."""

    @mx.custom_function
    def f(y0: mx.array, x: mx.array, a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        t = _rows(x) @ scaled_a(a, s)
        return _unrows(mx.addmm(_rows(y0), t, b.T), y0), t

    @f.vjp
    def f_vjp(primals: list[mx.array], cotangents: list[mx.array], outputs: list[mx.array]) -> tuple:
        _, x, a, b = primals
        dy = _rows(cotangents[0])
        dx, da, db = _low_rank_grads(_rows(x), a, b, dy, outputs[1], s)
        return cotangents[0], _unrows(dx, x), da, db

    return cast(LoraLowRank, f)


@lru_cache(maxsize=64)
def dora(s: float, merged: bool) -> DoraFused:
    """f(x, W, W′ or W, A, B, m, inv, ones) -> (y, u, t, g): y = g ⊙ u without the bias (see the module
    docstring); ``merged``: u = x W′ᵀ from the third argument, else u = x Wᵀ + t Bᵀ. t is empty when merged (the
    backward recomputes it)."""

    @mx.custom_function
    def f(x: mx.array, w: mx.array, wp: mx.array, a: mx.array, b: mx.array, m: mx.array, inv: mx.array,
          ones: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:  # fmt: skip
        x2 = _rows(x)
        if merged:
            u, t = x2 @ wp.T, mx.zeros((0,), x.dtype)
        else:
            t = x2 @ scaled_a(a, s)
            u = mx.addmm(x2 @ w.T, t, b.T)
        g = m * inv + ones
        return _unrows(g * u, x), u, t, g

    @f.vjp
    def f_vjp(primals: list[mx.array], cotangents: list[mx.array], outputs: list[mx.array]) -> tuple:
        x, w, wp, a, b, _, inv, ones = primals
        dy, u = _rows(cotangents[0]), outputs[1]
        x2 = _rows(x)
        t = x2 @ scaled_a(a, s) if merged else outputs[2]
        du = outputs[3] * dy
        dxq, da, db = _low_rank_grads(x2, a, b, du, t, s)
        dx = _unrows(mx.addmm(dxq, du, w), x)
        dm = inv * mx.sum(dy * u, axis=0)
        # W̄ and the constants' zeros are lazy: nothing computes them unless a caller asks for them
        dw = du.T @ x2
        return dx, dw, mx.zeros_like(wp), da, db, dm, mx.zeros_like(inv), mx.zeros_like(ones)

    return cast(DoraFused, f)
