"""IA3 and VeRA kernels on CuPy arrays (``kernels/ia3.cu``, ``kernels/vera.cu``): scalings fused into one pass.

IA3: y ↦ y ⊙ l over the columns of [T, d], and its backward (dy ⊙ l and dl = Σ_t dy ⊙ y) in one pass over dy.
VeRA: out = base + α · sm ⊙ (P diag(sk) Q) ⊙ snᵀ, the scaled low-rank product added without an intermediate.
Activations float32 or bfloat16 (uint16); scales, factors and dl float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl_cupy._launch import THREADS, blocks, dense, f32, i32, i64, optional, suffix, written
from peftdecl_cupy._modules import kernel

_BACKWARD_ROWS = 512  # rows one thread block of scale_columns_backward sums before its atomic add
MAX_RANK = 1 << 30  # lowrank_add loops over any rank


def _cp() -> Any:
    import cupy

    return cupy


def scale_columns(y: Any, scale: Any, out: Any = None) -> Any:
    """y [T, d] ⊙ l [d] (``out`` may be ``y``: in place)."""
    y, scale = dense(y, scale)
    rows, d = y.shape
    out = _cp().empty_like(y) if out is None else written(out)
    kernel("ia3", f"scale_columns_{suffix(y)}")(
        (blocks(rows * d),), (THREADS,), (y, scale, out, i64(rows), i32(d))
    )
    return out


def scale_columns_backward(
    dy: Any, y: Any, scale: Any, dy_scaled: Any = None, dl: Any = None
) -> tuple[Any, Any]:
    """(dy ⊙ l, Σ_t dy ⊙ y) for y [T, d] the scaled tensor's input, in one pass over dy."""
    cp = _cp()
    dy, y, scale = dense(dy, y, scale)
    rows, d = dy.shape
    dy_scaled = cp.empty_like(dy) if dy_scaled is None else written(dy_scaled)
    dl = cp.zeros(d, dtype=np.float32) if dl is None else written(dl)
    grid = (max(1, -(-d // 32)), max(1, -(-rows // _BACKWARD_ROWS)))
    kernel("ia3", f"scale_columns_backward_{suffix(dy)}")(
        grid, (32, 8), (dy, y, scale, dy_scaled, dl, i64(rows), i32(d), i64(_BACKWARD_ROWS))
    )
    return dy_scaled, dl


def lowrank_add(
    base: Any | None,
    p: Any,
    q: Any,
    *,
    sm: Any | None = None,
    sn: Any | None = None,
    sk: Any | None = None,
    alpha: float = 1.0,
    out: Any,
) -> Any:
    """out[m, n] = base[m, n] + α · sm[m] · sn[n] · Σ_k p[m, k] · sk[k] · q[k, n], p and q float32 views of any
    strides (a transpose or slice is read in place); ``base`` may be None or ``out`` itself."""
    base, sm, sn, sk = dense(base, sm, sn, sk)
    written(out)
    rows, rank = p.shape
    cols = q.shape[1]
    item = p.itemsize
    kernel("vera", f"lowrank_add_{suffix(out)}")(
        (max(1, -(-cols // 64)), max(1, -(-rows // 64))),
        (THREADS,),
        (
            optional(base),
            p,
            i64(p.strides[0] // item),
            i64(p.strides[1] // item),
            q,
            i64(q.strides[0] // item),
            i64(q.strides[1] // item),
            optional(sm),
            optional(sn),
            optional(sk),
            f32(alpha),
            out,
            i64(rows),
            i64(cols),
            i32(rank),
        ),
    )
    return out
