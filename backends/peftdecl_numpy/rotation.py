"""Orthogonal-rotation building blocks shared by OFT and BOFT, each with its gradient.

Skew blocks Q = U − Uᵀ from a strict upper triangle; the Cayley transform R = (I − Q)(I + Q)⁻¹ and HF PEFT's
Neumann series R ≈ I + 2Q + … + 2Q^{m−1} + Q^m (its coefficients come with the OFT layout); rotations applied
blockwise to row vectors (x_blk ↦ x_blk R_i, never as a dense d × d matrix); and the flattened k × k patches a
convolution reads. The butterfly permutations are part of the BOFT layout (:mod:`peftdecl.plan.kinds.boft`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from peftdecl.plan.kinds.oft import neumann_coefficients
from peftdecl_numpy.xp_ops import Array, einsum, eye_like, namespace, pad_spatial, spatial, swap_last


# -- skew-symmetric blocks from their strict upper triangle --------------------------------------------------
def _triu_map(like: Array, block: int) -> Array:
    """[b(b−1)/2, b·b]: entry k of the strict upper triangle (row-major) sent to its place in the flat block."""
    rows, cols = np.triu_indices(block, 1)
    table = np.zeros((rows.size, block * block))
    table[np.arange(rows.size), rows * block + cols] = 1.0
    return namespace(like).asarray(table, dtype=like.dtype)


def skew_from_triu(u: Array, block: int) -> Array:
    """[m, b(b−1)/2] -> Q [m, b, b] with Q = U − Uᵀ, U holding ``u`` row-major above the diagonal."""
    xp = namespace(u)
    q = xp.reshape(u @ _triu_map(u, block), (u.shape[0], block, block))
    return q - swap_last(q)


def triu_grad(grad_q: Array) -> Array:
    """dL/du from dL/dQ for Q = U − Uᵀ."""
    xp, block = namespace(grad_q), grad_q.shape[-1]
    antisym = xp.reshape(grad_q - swap_last(grad_q), (grad_q.shape[0], block * block))
    return antisym @ _triu_map(grad_q, block).T


# -- Cayley transform and its Neumann approximation ----------------------------------------------------------
def cayley(s: Array) -> Array:
    """R = (I − S)(I + S)⁻¹ for a batch [..., b, b], solved as R (I + S) = I − S."""
    xp, eye = namespace(s), eye_like(s, s.shape[-1])
    return swap_last(xp.linalg.solve(swap_last(eye + s), swap_last(eye - s)))


def cayley_backward(s: Array, r: Array, grad_r: Array) -> Array:
    """dL/dS from dL/dR: dR = −(I + R) dS (I + S)⁻¹, so dL/dS = −(I + R)ᵀ G (I + S)⁻ᵀ."""
    xp, eye = namespace(s), eye_like(s, s.shape[-1])
    left = swap_last(eye + r) @ grad_r
    # X = left · (I + S)⁻ᵀ  ⇔  X (I + S)ᵀ = left  ⇔  (I + S) Xᵀ = leftᵀ
    return -swap_last(xp.linalg.solve(eye + s, swap_last(left)))


def _identities(q: Array) -> Array:
    xp = namespace(q)
    return xp.zeros_like(q) + eye_like(q, q.shape[-1])


def neumann(q: Array, terms: int) -> Array:
    """R = Σ_k c_k Q^k (approximates (I + Q)(I − Q)⁻¹, the transpose of :func:`cayley`)."""
    out = namespace(q).zeros_like(q)
    power = _identities(q)
    for k, c in enumerate(neumann_coefficients(terms)):
        if k:
            power = power @ q
        out += c * power
    return out


def neumann_backward(q: Array, terms: int, grad_r: Array) -> Array:
    """dL/dQ = Σ_k c_k Σ_{j<k} (Q^j)ᵀ G (Q^{k−1−j})ᵀ."""
    coeffs = neumann_coefficients(terms)
    powers = [_identities(q)]
    for _ in range(len(coeffs) - 2):
        powers.append(powers[-1] @ q)
    powers_t = [swap_last(p) for p in powers]
    grad = namespace(q).zeros_like(q)
    for k, c in enumerate(coeffs):
        for j in range(k):
            grad += c * (powers_t[j] @ grad_r @ powers_t[k - 1 - j])
    return grad


# -- blockwise rotation of row vectors -----------------------------------------------------------------------
def rotate_blocks(x: Array, r: Array) -> Array:
    """x [..., n·b] -> x · blockdiag(R_1..R_n), computed per block as x_blk R_i."""
    xp = namespace(x, r)
    n, b, _ = r.shape
    blocks = xp.reshape(x, (*x.shape[:-1], n, b))
    return xp.reshape(einsum("...nk,nkc->...nc", blocks, r), x.shape)


def rotate_blocks_backward(x: Array, r: Array, grad_y: Array) -> tuple[Array, Array]:
    """(dL/dx, dL/dR) of :func:`rotate_blocks`."""
    xp = namespace(x, r, grad_y)
    n, b, _ = r.shape
    xb = xp.reshape(x, (-1, n, b))
    gb = xp.reshape(grad_y, (-1, n, b))
    grad_x = xp.reshape(einsum("tnc,nkc->tnk", gb, r), x.shape)
    return grad_x, einsum("tnk,tnc->nkc", xb, gb)


# -- convolution patches -------------------------------------------------------------------------------------
def _windows(
    shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, ...], list[tuple[slice, ...]]]:
    out = tuple(
        (n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(shape, kernel, stride, dilation, strict=True)
    )
    windows = [
        tuple(
            slice(o * d, o * d + s * (m - 1) + 1, s)
            for o, d, s, m in zip(offset, dilation, stride, out, strict=True)
        )
        for offset in itertools.product(*(range(k) for k in kernel))
    ]
    return out, windows


def conv_patches(
    x: Array,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Array:
    """x [N, C, *spatial] -> [N, *out, C·Πk]: the patch each output position reads, flattened like the weight
    ``W.reshape(out, C·Πk)`` (channel-major, then kernel offsets row-major)."""
    xp = namespace(x)
    padded = pad_spatial(x, padding)
    out, windows = _windows(padded.shape[2:], kernel, stride, dilation)
    stacked = xp.stack([padded[spatial(w)] for w in windows], axis=2)  # [N, C, K, *out]
    n, c, k = stacked.shape[:3]
    return xp.moveaxis(xp.reshape(stacked, (n, c * k, *out)), 1, -1)


def conv_patches_backward(
    grad: Array,
    x_shape: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Array:
    """dL/dx of :func:`conv_patches`: every patch entry flows back to the input pixel it was read from."""
    n, c = x_shape[:2]
    padded = [s + 2 * p for s, p in zip(x_shape[2:], padding, strict=True)]
    out, windows = _windows(padded, kernel, stride, dilation)
    xp = namespace(grad)
    g = xp.reshape(xp.moveaxis(grad, -1, 1), (n, c, len(windows), *out))
    dxp = xp.zeros((n, c, *padded), dtype=grad.dtype)
    for i, w in enumerate(windows):
        dxp[spatial(w)] += g[:, :, i, ...]
    crop = tuple(slice(p, p + s) for p, s in zip(padding, x_shape[2:], strict=True))
    return dxp[spatial(crop)]
