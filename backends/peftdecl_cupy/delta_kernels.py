"""LoHa and LoKr kernels on CuPy arrays (``kernels/loha.cu``, ``kernels/lokr.cu``): ΔW built in one kernel.

LoHa: ΔW = s · (a1 b1) ⊙ (a2 b2) and the factor gradients' Hadamard part dp1 = s·g ⊙ (a2 b2), dp2 = s·g ⊙ (a1 b1)
(the products themselves are never stored). LoKr: ΔW = s · kron(w1, w2) and (dw1, dw2). Factors and results in
one dtype, float32 or bfloat16 (uint16); a base W may be added in the same pass.
"""

from __future__ import annotations

from typing import Any

from peftdecl_cupy._launch import THREADS, blocks, dense, f32, i32, i64, optional, suffix, written
from peftdecl_cupy._modules import kernel

MAX_RANK = 256  # LoHa's ranks (one row of each a in shared memory)
MAX_ROWS = 65535  # LoHa's output rows (one grid row each: CUDA's grid y limit)


def _cp() -> Any:
    import cupy

    return cupy


def loha_delta(
    a1: Any, b1: Any, a2: Any, b2: Any, scale: float, base: Any | None = None, out: Any = None
) -> Any:
    """base + s · (a1 b1) ⊙ (a2 b2), [out, in]."""
    a1, b1, a2, b2, base = dense(a1, b1, a2, b2, base)
    rows, cols = a1.shape[0], b1.shape[1]
    if rows > MAX_ROWS:
        raise ValueError(f"loha_delta: {rows} output rows, the kernel's grid takes at most {MAX_ROWS}")
    out = _cp().empty((rows, cols), dtype=a1.dtype) if out is None else written(out)
    kernel("loha", f"loha_delta_{suffix(a1)}")(
        (blocks(cols), rows),
        (THREADS,),
        (a1, b1, a2, b2, optional(base), out, i64(cols), i32(a1.shape[1]), i32(a2.shape[1]), f32(scale)),
    )
    return out


def loha_backward(
    g: Any, a1: Any, b1: Any, a2: Any, b2: Any, scale: float, dp1: Any = None, dp2: Any = None
) -> tuple[Any, Any]:
    """(s·g ⊙ (a2 b2), s·g ⊙ (a1 b1)): the gradients at the two Hadamard factors."""
    cp = _cp()
    g, a1, b1, a2, b2 = dense(g, a1, b1, a2, b2)
    rows, cols = g.shape
    dp1 = cp.empty_like(g) if dp1 is None else written(dp1)
    dp2 = cp.empty_like(g) if dp2 is None else written(dp2)
    kernel("loha", f"loha_backward_{suffix(g)}")(
        (blocks(cols), rows),
        (THREADS,),
        (g, a1, b1, a2, b2, dp1, dp2, i64(cols), i32(a1.shape[1]), i32(a2.shape[1]), f32(scale)),
    )
    return dp1, dp2


def kron_delta(w1: Any, w2: Any, scale: float, base: Any | None = None, out: Any = None) -> Any:
    """base + s · kron(w1, w2) for matrices w1 [m1, n1], w2 [p, q]: [m1·p, n1·q]."""
    w1, w2, base = dense(w1, w2, base)
    (m1, n1), (p, q) = w1.shape, w2.shape
    out = _cp().empty((m1 * p, n1 * q), dtype=w1.dtype) if out is None else written(out)
    total = m1 * p * n1 * q
    kernel("lokr", f"kron_delta_{suffix(w1)}")(
        (blocks(total),),
        (THREADS,),
        (w1, w2, optional(base), out, i32(n1), i32(p), i32(q), i64(total), f32(scale)),
    )
    return out


def kron_backward(
    g: Any, w1: Any, w2: Any, scale: float, dw1: Any = None, dw2: Any = None
) -> tuple[Any, Any]:
    """(dL/dw1, dL/dw2) of s · kron(w1, w2) given dL/dΔW = g."""
    g, w1, w2 = dense(g, w1, w2)
    cp = _cp()
    (m1, n1), (p, q) = w1.shape, w2.shape
    dw1 = cp.empty_like(w1) if dw1 is None else written(dw1)
    dw2 = cp.empty_like(w2) if dw2 is None else written(dw2)
    name = suffix(g)
    kernel("lokr", f"kron_backward_w1_{name}")(
        (m1 * n1,), (THREADS,), (g, w2, dw1, i32(n1), i32(p), i32(q), f32(scale))
    )
    kernel("lokr", f"kron_backward_w2_{name}")(
        (blocks(p * q),), (THREADS,), (g, w1, dw2, i32(m1), i32(n1), i32(p), i32(q), f32(scale))
    )
    return dw1, dw2
