"""Orthogonal-rotation building blocks shared by OFT and BOFT (torch, differentiable by autograd).

Skew blocks Q = U − Uᵀ from a strict upper triangle; the Cayley transform R = (I − Q)(I + Q)⁻¹ and HF PEFT's
Neumann series; rotations applied blockwise to row vectors (x_blk ↦ x_blk R_i as one batched matmul, never as a
dense d × d matrix); butterfly permutations (gathers).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from peftdecl.plan.kinds.boft import butterfly_perms as factor_perms
from peftdecl.plan.kinds.oft import neumann_coefficients
from peftdecl_torch import cuda_kernels


def skew_from_triu(u: torch.Tensor, block: int) -> torch.Tensor:
    """[m, b(b−1)/2] -> Q [m, b, b] with Q = U − Uᵀ, U holding ``u`` row-major above the diagonal."""
    rows, cols = torch.triu_indices(block, block, 1, device=u.device)
    q = u.new_zeros(u.shape[0], block, block)
    q[:, rows, cols] = u
    return q - q.transpose(1, 2)


@cuda_kernels.replaces("cayley")
def cayley(s: torch.Tensor) -> torch.Tensor:
    """R = (I − S)(I + S)⁻¹ for a batch [..., b, b], solved as R (I + S) = I − S."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    r: torch.Tensor = torch.linalg.solve(eye + s, eye - s, left=False)
    return r


@cuda_kernels.replaces("neumann")
def neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """R = Σ_k c_k Q^k, HF PEFT's series (approximates (I + Q)(I − Q)⁻¹, the transpose of :func:`cayley`)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    out, power = eye.clone(), eye
    for k, c in enumerate(neumann_coefficients(terms)):
        if k:
            power = power @ q
            out = out + c * power
    return out


@cuda_kernels.replaces("rotate_blocks")
def rotate_blocks(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x [..., n·b] -> x · blockdiag(R_1..R_n), as one batched matmul over the n blocks."""
    n, b, _ = r.shape
    blocks = x.reshape(-1, n, b).transpose(0, 1)  # [n, T, b]
    return torch.bmm(blocks, r).transpose(0, 1).reshape(x.shape)


@functools.lru_cache(maxsize=64)
def _perms(
    width: int, block_num: int, block_size: int, factors: int
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    # factor i pairs blocks 2^i apart; a single factor is plain block-diagonal OFT (no permutation)
    return tuple((p, np.argsort(p)) for p in factor_perms(width, block_num, block_size, factors))


def butterfly_perms(
    width: int, block_num: int, block_size: int, factors: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per factor: (p, p⁻¹) as index tensors, or None for the identity (no gather needed)."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for perm, inverse in _perms(width, block_num, block_size, factors):
        if np.array_equal(perm, np.arange(width)):
            out.append(None)
        else:
            out.append((torch.as_tensor(perm, device=device), torch.as_tensor(inverse, device=device)))
    return out


@cuda_kernels.replaces("butterfly")
def butterfly(x: torch.Tensor, q: torch.Tensor, perms: list) -> torch.Tensor:
    """x M for M = B_{N−1} ⋯ B_0, B_i = P_i · blockdiag(Q_i) · P_iᵀ, factor by factor (gathers and bmm)."""
    for i in reversed(range(len(perms))):
        pair = perms[i]
        if pair is None:
            x = rotate_blocks(x, q[i])
        else:
            perm, inverse = pair
            x = rotate_blocks(x.index_select(-1, inverse), q[i]).index_select(-1, perm)
    return x
