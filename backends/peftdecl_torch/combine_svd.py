"""The SVD behind ``add_weighted_adapter``'s ``*_svd`` types on the torch backend: torch's float32 routine.

HF PEFT factorises each combined ΔW with ``torch.linalg.svd`` in the adapters' float32. The product U S Vᵀ does not
depend on the routine, but the sign of each singular pair does, and ``svd_clamp`` clips to a quantile of the signed
entries of U S and Vᵀ; taking the same routine on the same float32 matrix gives PEFT's clipped factors.
"""

from __future__ import annotations

import numpy as np
import torch


def float32_svd(matrix: np.ndarray, full_matrices: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, S, Vᵀ) of ``matrix`` rounded to float32, from ``torch.linalg.svd`` on the CPU, as float64 arrays."""
    tensor = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
    u, s, vh = torch.linalg.svd(tensor, full_matrices=full_matrices)
    return u.double().numpy(), s.double().numpy(), vh.double().numpy()
