"""OFT and BOFT kernels on CuPy arrays (``kernels/oft.cu``, ``kernels/boft.cu``).

Rotations act on row vectors, x [T, n·b] ↦ x · blockdiag(R_1..R_n) (``transpose``: the blocks' transposes), the
BOFT factor with its permutation folded into the indexing; ``*_tn`` give dL/dR_i = Σ_t x_iᵀ g_i. Rotation blocks
and gradients are float32; activations float32 or bfloat16 (uint16). Blocks at most :data:`MAX_BLOCK` wide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from peftdecl_cupy._launch import THREADS, dense, f32, i32, i64, optional, suffix, written
from peftdecl_cupy._modules import kernel

MAX_BLOCK = 64
_TILE_ELEMS = 4096  # rows · b of rotate_blocks' shared tile (kernels/oft.cu)
_TN_ROWS = 1024  # rows one thread block of block_tn sums before its atomic add


def _cp() -> Any:
    import cupy

    return cupy


def _grid_rows(rows: int, b: int) -> int:
    return max(1, -(-rows // (_TILE_ELEMS // b)))


def rotate_blocks(x: Any, r: Any, transpose: bool = False, out: Any = None) -> Any:
    """x [T, n·b] · blockdiag(R) for R [n, b, b] float32 ([1, b, b]: one block shared by all n)."""
    x, r = dense(x, r)
    rows, width = x.shape
    b = r.shape[-1]
    n = width // b
    out = _cp().empty_like(x) if out is None else written(out)
    stride = 0 if r.shape[0] == 1 else b * b
    kernel("oft", f"rotate_blocks_{suffix(x)}")(
        (_grid_rows(rows, b), n),
        (THREADS,),
        (x, r, out, i64(rows), i32(n), i32(b), i32(stride), i32(transpose)),
    )
    return out


def block_tn(x: Any, g: Any, b: int, out: Any = None) -> Any:
    """Σ_t x_iᵀ g_i per block i: [n, b, b] float32."""
    x, g = dense(x, g)
    rows, width = x.shape
    n = width // b
    out = _cp().zeros((n, b, b), dtype=np.float32) if out is None else written(out)
    kernel("oft", f"block_tn_{suffix(x)}")(
        (max(1, -(-rows // _TN_ROWS)), n), (THREADS,), (x, g, out, i64(rows), i32(n), i32(b), i64(_TN_ROWS))
    )
    return out


def skew_solve(s: Any, rhs: Any, sign: float = 1.0, out: Any = None) -> Any:
    """(I + sign·S_m)⁻¹ RHS_m for [m, b, b] float32 (no pivoting: for skew-symmetric S)."""
    s, rhs = dense(s, rhs)
    m, b, _ = s.shape
    out = _cp().empty_like(rhs) if out is None else written(out)
    kernel("oft", "skew_solve_f32")((m,), (THREADS,), (s, rhs, out, i32(b), f32(sign)))
    return out


def neumann(q: Any, coefficients: Sequence[float], out: Any = None) -> Any:
    """Σ_j c_j Q_m^j for [m, b, b] float32."""
    cp = _cp()
    (q,) = dense(q)
    m, b, _ = q.shape
    coeffs = cp.asarray(np.asarray(coefficients, dtype=np.float32))
    out = cp.empty_like(q) if out is None else written(out)
    kernel("oft", "neumann_f32")((m,), (THREADS,), (q, coeffs, i32(len(coefficients)), out, i32(b)))
    return out


def butterfly_factor(x: Any, q: Any, idx: Any | None, transpose: bool = False, out: Any = None) -> Any:
    """One BOFT factor on x [T, n·b]: y[:, idx[j]] = Σ_k x[:, idx[i·b + k]] Q[i, k, c] (j = i·b + c; idx int32,
    the inverse of the factor's permutation, None for the identity)."""
    x, q, idx = dense(x, q, idx)
    rows = x.shape[0]
    n, b, _ = q.shape
    out = _cp().empty_like(x) if out is None else written(out)
    kernel("boft", f"butterfly_factor_{suffix(x)}")(
        (_grid_rows(rows, b), n),
        (THREADS,),
        (x, q, optional(idx), out, i64(rows), i32(n), i32(b), i32(transpose)),
    )
    return out


def butterfly_factor_tn(x: Any, g: Any, idx: Any | None, b: int, out: Any = None) -> Any:
    """dL/dQ of :func:`butterfly_factor`: Σ_t x[t, idx[i·b + k]] g[t, idx[i·b + c]], [n, b, b] float32."""
    x, g, idx = dense(x, g, idx)
    rows, width = x.shape
    n = width // b
    out = _cp().zeros((n, b, b), dtype=np.float32) if out is None else written(out)
    kernel("boft", f"butterfly_factor_tn_{suffix(x)}")(
        (max(1, -(-rows // _TN_ROWS)), n),
        (THREADS,),
        (x, g, optional(idx), out, i64(rows), i32(n), i32(b), i64(_TN_ROWS)),
    )
    return out


__all__ = [
    "MAX_BLOCK",
    "block_tn",
    "butterfly_factor",
    "butterfly_factor_tn",
    "neumann",
    "rotate_blocks",
    "skew_solve",
]
