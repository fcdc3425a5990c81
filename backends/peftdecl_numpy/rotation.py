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


# -- skew-symmetric blocks from their strict upper triangle --------------------------------------------------
def skew_from_triu(u: np.ndarray, block: int) -> np.ndarray:
    """[m, b(b−1)/2] -> Q [m, b, b] with Q = U − Uᵀ, U holding ``u`` row-major above the diagonal."""
    rows, cols = np.triu_indices(block, 1)
    q = np.zeros((u.shape[0], block, block))
    q[:, rows, cols] = u
    return q - q.transpose(0, 2, 1)


def triu_grad(grad_q: np.ndarray) -> np.ndarray:
    """dL/du from dL/dQ for Q = U − Uᵀ."""
    rows, cols = np.triu_indices(grad_q.shape[-1], 1)
    return grad_q[:, rows, cols] - grad_q[:, cols, rows]


# -- Cayley transform and its Neumann approximation ----------------------------------------------------------
def cayley(s: np.ndarray) -> np.ndarray:
    """R = (I − S)(I + S)⁻¹ for a batch [..., b, b], solved as R (I + S) = I − S."""
    eye = np.eye(s.shape[-1])
    return np.swapaxes(np.linalg.solve(np.swapaxes(eye + s, -1, -2), np.swapaxes(eye - s, -1, -2)), -1, -2)


def cayley_backward(s: np.ndarray, r: np.ndarray, grad_r: np.ndarray) -> np.ndarray:
    """dL/dS from dL/dR: dR = −(I + R) dS (I + S)⁻¹, so dL/dS = −(I + R)ᵀ G (I + S)⁻ᵀ."""
    eye = np.eye(s.shape[-1])
    left = np.swapaxes(eye + r, -1, -2) @ grad_r
    # X = left · (I + S)⁻ᵀ  ⇔  X (I + S)ᵀ = left  ⇔  (I + S) Xᵀ = leftᵀ
    return -np.swapaxes(np.linalg.solve(eye + s, np.swapaxes(left, -1, -2)), -1, -2)


def neumann(q: np.ndarray, terms: int) -> np.ndarray:
    """R = Σ_k c_k Q^k (approximates (I + Q)(I − Q)⁻¹, the transpose of :func:`cayley`)."""
    out = np.zeros_like(q)
    power = np.broadcast_to(np.eye(q.shape[-1]), q.shape).copy()
    for k, c in enumerate(neumann_coefficients(terms)):
        if k:
            power = power @ q
        out += c * power
    return out


def neumann_backward(q: np.ndarray, terms: int, grad_r: np.ndarray) -> np.ndarray:
    """dL/dQ = Σ_k c_k Σ_{j<k} (Q^j)ᵀ G (Q^{k−1−j})ᵀ."""
    coeffs = neumann_coefficients(terms)
    powers = [np.broadcast_to(np.eye(q.shape[-1]), q.shape).copy()]
    for _ in range(len(coeffs) - 2):
        powers.append(powers[-1] @ q)
    powers_t = [np.swapaxes(p, -1, -2) for p in powers]
    grad = np.zeros_like(q)
    for k, c in enumerate(coeffs):
        for j in range(k):
            grad += c * (powers_t[j] @ grad_r @ powers_t[k - 1 - j])
    return grad


# -- blockwise rotation of row vectors -----------------------------------------------------------------------
def rotate_blocks(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """x [..., n·b] -> x · blockdiag(R_1..R_n), computed per block as x_blk R_i."""
    n, b, _ = r.shape
    blocks = x.reshape(*x.shape[:-1], n, b)
    return np.einsum("...nk,nkc->...nc", blocks, r).reshape(x.shape)


def rotate_blocks_backward(x: np.ndarray, r: np.ndarray, grad_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dx, dL/dR) of :func:`rotate_blocks`."""
    n, b, _ = r.shape
    xb = x.reshape(-1, n, b)
    gb = grad_y.reshape(-1, n, b)
    grad_x = np.einsum("tnc,nkc->tnk", gb, r).reshape(x.shape)
    return grad_x, np.einsum("tnk,tnc->nkc", xb, gb)


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
    x: np.ndarray,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> np.ndarray:
    """x [N, C, *spatial] -> [N, *out, C·Πk]: the patch each output position reads, flattened like the weight
    ``W.reshape(out, C·Πk)`` (channel-major, then kernel offsets row-major)."""
    xp = np.pad(x, [(0, 0), (0, 0), *((p, p) for p in padding)])
    out, windows = _windows(xp.shape[2:], kernel, stride, dilation)
    stacked = np.stack([xp[(slice(None), slice(None), *w)] for w in windows], axis=2)  # [N, C, K, *out]
    n, c, k = stacked.shape[:3]
    return np.moveaxis(stacked.reshape(n, c * k, *out), 1, -1)


def conv_patches_backward(
    grad: np.ndarray,
    x_shape: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> np.ndarray:
    """dL/dx of :func:`conv_patches`: every patch entry flows back to the input pixel it was read from."""
    n, c = x_shape[:2]
    padded = [s + 2 * p for s, p in zip(x_shape[2:], padding, strict=True)]
    out, windows = _windows(padded, kernel, stride, dilation)
    g = np.moveaxis(grad, -1, 1).reshape(n, c, len(windows), *out)
    dxp = np.zeros((n, c, *padded))
    for i, w in enumerate(windows):
        dxp[(slice(None), slice(None), *w)] += g[:, :, i]
    crop = tuple(slice(p, p + s) for p, s in zip(padding, x_shape[2:], strict=True))
    return dxp[(slice(None), slice(None), *crop)]
