"""Task-vector merging rules of HF PEFT's ``add_weighted_adapter`` in float64 NumPy (no torch).

Each rule maps tensors t_i of one shape and weights w_i to one tensor: task arithmetic Σ w_i t_i; magnitude
pruning keeps the k = ⌊density · numel⌋ largest |t_i| before summing; TIES prunes the same way, keeps only the
entries whose sign agrees with the elected sign of Σ t_i ("total") or Σ sign(t_i) ("frequency"), and averages
the kept w_i t_i over how many were kept. DARE keeps each entry with probability ``density`` (a Bernoulli mask
from a ``KeepMask``) and divides by ``density``, then sums (``dare_linear``) or merges as TIES (``dare_ties``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

SIGN_METHODS = ("total", "frequency")

KeepMask = Callable[[tuple[int, ...], float], np.ndarray]
"""(shape, density) -> a 0/1 array of that shape, each entry 1 with probability ``density``."""

Svd = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""(matrix, full_matrices) -> (U, S, Vᵀ) as ``np.linalg.svd`` returns them. Which signs the singular pairs get is the
routine's choice; ``svd_clamp``'s quantile depends on it, so a backend may supply its framework's routine."""


def numpy_svd(matrix: np.ndarray, full_matrices: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy's LAPACK SVD in float64."""
    u, s, vh = np.linalg.svd(matrix, full_matrices=full_matrices)
    return u, s, vh


def task_arithmetic(tensors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ w_i t_i."""
    return np.asarray(np.sum([w * t for t, w in zip(tensors, weights, strict=True)], axis=0))


def magnitude_pruned(tensor: np.ndarray, density: float) -> np.ndarray:
    """``tensor`` with all but its ⌊density · numel⌋ largest-magnitude entries set to 0 (kept whole at
    density ≥ 1, as PEFT)."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.size)
    flat = tensor.reshape(-1)
    mask = np.zeros(flat.shape, dtype=tensor.dtype)
    if keep > 0:
        mask[np.argpartition(-np.abs(flat), keep - 1)[:keep]] = 1
    return (flat * mask).reshape(tensor.shape)


def magnitude_prune(tensors: Sequence[np.ndarray], weights: Sequence[float], density: float) -> np.ndarray:
    """Σ w_i prune(t_i)."""
    return task_arithmetic([magnitude_pruned(t, density) for t in tensors], weights)


def dare_pruned(tensor: np.ndarray, density: float, keep_mask: KeepMask) -> np.ndarray:
    """``tensor`` ⊙ m / density, m ~ Bernoulli(density) (kept whole, and nothing drawn, at density ≥ 1, as PEFT)."""
    if density >= 1:
        return tensor
    return tensor * keep_mask(tensor.shape, density) / density


def ties(
    tensors: Sequence[np.ndarray], weights: Sequence[float], density: float, majority_sign_method: str
) -> np.ndarray:
    """TIES: magnitude-prune, then :func:`disjoint_merge`."""
    return disjoint_merge([magnitude_pruned(t, density) for t in tensors], weights, majority_sign_method)


def disjoint_merge(
    pruned: Sequence[np.ndarray], weights: Sequence[float], majority_sign_method: str
) -> np.ndarray:
    """Elect a sign per entry (from the unweighted pruned tensors), then average the weighted entries that carry
    that sign: Σ_i [sign t_i = s] w_i t_i / max(1, #{i: sign t_i = s})."""
    stacked = np.stack(pruned)
    signs = np.sign(stacked)
    votes = stacked.sum(axis=0) if majority_sign_method == "total" else signs.sum(axis=0)
    elected = np.where(votes >= 0, 1.0, -1.0)
    agrees = signs == elected
    weighted = stacked * np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * (stacked.ndim - 1))
    return np.asarray((weighted * agrees).sum(axis=0) / np.maximum(agrees.sum(axis=0), 1))


def combine(
    rule: str,
    tensors: Sequence[np.ndarray],
    weights: Sequence[float],
    density: float | None,
    majority_sign_method: str,
    keep_mask: KeepMask | None = None,
) -> np.ndarray:
    """Apply the rule named by a combination type with its ``_svd`` suffix removed (DARE draws its masks from
    ``keep_mask``, one tensor after another)."""
    if rule in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    assert density is not None  # checked by the caller, naming the argument
    if rule == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if rule == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if rule in ("dare_linear", "dare_ties") and keep_mask is not None:
        pruned = [dare_pruned(t, density, keep_mask) for t in tensors]
        if rule == "dare_linear":
            return task_arithmetic(pruned, weights)
        return disjoint_merge(pruned, weights, majority_sign_method)
    raise ValueError(f"no merging rule {rule!r}")


def truncated_svd_factors(
    delta: np.ndarray, rank: int, clamp: float | None, full_matrices: bool, svd: Svd = numpy_svd
) -> tuple[np.ndarray, np.ndarray]:
    """ΔW [out, in] ≈ (U_r S_r) V_rᵀ: returns (B = U_r S_r, A = V_rᵀ); with ``clamp`` both are clipped to
    ±q, q the ``clamp`` quantile of all their entries together (PEFT's svd_clamp)."""
    u, s, vh = svd(delta, full_matrices)
    b, a = u[:, :rank] * s[:rank], vh[:rank, :]
    if clamp is not None:
        high = float(np.quantile(np.concatenate([b.reshape(-1), a.reshape(-1)]), clamp))
        b, a = np.clip(b, -high, high), np.clip(a, -high, high)
    return b, a


def low_rank_svd_factors(b_cat: np.ndarray, a_cat: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank-``rank`` truncated SVD of ΔW = B' A' (B' [out, R], A' [R, in]) without forming ΔW: with QRs
    B' = Q_b R_b and A'ᵀ = Q_a R_a, ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD U_s S V_sᵀ of the small core gives V = Q_a V_s
    and U S = ΔW V = B' R_aᵀ V_s (Q_b is never formed). Returns (B = U_r S_r, A = V_rᵀ) as
    :func:`truncated_svd_factors` does, exact up to rounding, in O((out + in) R²) instead of O(out · in · min(out, in));
    each pair's sign is LAPACK's choice on the core. Needs rank ≤ min(out, in, R)."""
    r_b = np.linalg.qr(b_cat, mode="r")
    q_a, r_a = np.linalg.qr(a_cat.T)
    _, _, vh = np.linalg.svd(r_b @ r_a.T)
    v = vh[:rank].T
    return b_cat @ (r_a.T @ v), (q_a @ v).T
