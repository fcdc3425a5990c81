"""Orthogonal-rotation building blocks of OFT and BOFT on MLX (the NumPy reference's rotation.py, differentiable).

Skew blocks Q = U − Uᵀ from a strict upper triangle; the Cayley transform R = (I − Q)(I + Q)⁻¹ with its gradient
dL/dQ = −(I + R)ᵀ G (I + Q)⁻ᵀ (MLX has no derivative of the inverse); HF PEFT's Neumann series
R = Σ c_k Q^k; blockwise rotation of row vectors x_blk ↦ x_blk R_i; the butterfly, gathering by the permutations
of :func:`peftdecl.plan.kinds.boft.butterfly_perms`.
"""

from __future__ import annotations

import functools
from typing import cast

import mlx.core as mx
import numpy as np

from peftdecl.plan.kinds.oft import neumann_coefficients


@functools.lru_cache(maxsize=64)
def _triu_selector(block: int) -> np.ndarray:
    rows, cols = np.triu_indices(block, 1)
    selector = np.zeros((rows.size, block * block), dtype=np.float32)
    selector[np.arange(rows.size), rows * block + cols] = 1.0
    return selector


def skew_from_triu(u: mx.array, block: int) -> mx.array:
    """[m, b(b−1)/2] -> Q [m, b, b] with Q = U − Uᵀ, U holding ``u`` row-major above the diagonal."""
    upper = (u @ mx.array(_triu_selector(block), dtype=u.dtype)).reshape(u.shape[0], block, block)
    return upper - upper.swapaxes(-1, -2)


def _inverse(m: mx.array) -> mx.array:
    # the factorisation runs on the CPU stream (MLX's GPU has no inverse); blocks are small
    return mx.linalg.inv(m, stream=mx.cpu)


def cayley(s: mx.array) -> mx.array:
    """R = (I − S)(I + S)⁻¹ for a batch [..., b, b], with the gradient below."""
    return cast(mx.array, _cayley(s))


@mx.custom_function
def _cayley(s: mx.array) -> mx.array:
    eye = mx.eye(s.shape[-1], dtype=s.dtype)
    return (eye - s) @ _inverse(eye + s)


@_cayley.vjp
def _cayley_vjp(s: mx.array, grad_r: mx.array, r: mx.array) -> mx.array:
    eye = mx.eye(s.shape[-1], dtype=s.dtype)
    return -((eye + r).swapaxes(-1, -2) @ grad_r) @ _inverse(eye + s).swapaxes(-1, -2)


def neumann(q: mx.array, terms: int) -> mx.array:
    """R = Σ_k c_k Q^k (approximates (I + Q)(I − Q)⁻¹, the transpose of :func:`cayley`)."""
    eye = mx.eye(q.shape[-1], dtype=q.dtype)
    out = mx.broadcast_to(eye, q.shape)
    power = None
    for k, c in enumerate(neumann_coefficients(terms)):
        if k:
            power = q if power is None else power @ q
            out = out + c * power
    return out


def rotate_blocks(x: mx.array, r: mx.array) -> mx.array:
    """x [..., n·b] -> x · blockdiag(R_1..R_n), computed per block as x_blk R_i."""
    n, b, _ = r.shape
    blocks = x.reshape(-1, n, 1, b)
    return (blocks @ r).reshape(x.shape)


def butterfly(x: mx.array, q: mx.array, perms: tuple[np.ndarray, ...]) -> mx.array:
    """x M for M = B_{N−1} ⋯ B_0, B_i = P_i blockdiag(Q_i) P_iᵀ: gather by P_i, rotate, gather back."""
    for i in reversed(range(len(perms))):
        perm = np.asarray(perms[i])
        x = rotate_blocks(x[..., mx.array(np.argsort(perm))], q[i])[..., mx.array(perm)]
    return x
