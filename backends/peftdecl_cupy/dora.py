"""Launches of ``kernels/dora.cu``: DoRA's factored row norm and its fused output pass, on CuPy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl_cupy import planning
from peftdecl_cupy._modules import kernel
from peftdecl_cupy.lowrank import CupyLowRank, _cp, accumulation, null, suffix

Array = Any


class CupyDora:
    """The DoRA kernels (the ``DoraKernels`` of :mod:`peftdecl_cupy.table`); W Aᵀ and A Aᵀ are ``low``'s shrinks."""

    def __init__(self, low: CupyLowRank) -> None:
        self.low = low

    def accepts(self, *arrays: Array) -> bool:
        return self.low.accepts(*arrays)

    def norm(self, weight: Array, a: Array, b: Array, s: float, out: Array | None = None) -> Array:
        """n[o] = ‖W[o] + s (B A)[o]‖ from ‖W[o]‖², (W Aᵀ)[o] and A Aᵀ; in the accumulation type (into ``out``,
        a contiguous [rows] array, where given)."""
        cupy = _cp()
        weight, b = cupy.ascontiguousarray(weight), cupy.ascontiguousarray(b)
        rows, k = weight.shape
        rank = a.shape[0]
        acc = accumulation(weight.dtype)
        name = suffix(weight.dtype)
        squares = cupy.empty(rows, dtype=acc)
        kernel("dora", f"dora_row_sumsq_{name}")(
            (rows, 1, 1), (planning.THREADS,), (weight, np.int64(k), squares, np.int32(k))
        )
        wa = self.low.shrink(weight, a)  # [rows, rank]
        aat = self.low.shrink(cupy.ascontiguousarray(a), a)  # [rank, rank]
        n = cupy.empty(rows, dtype=acc) if out is None else out
        kernel("dora", f"dora_norm_{name}")(
            planning.norm_grid(rows),
            (planning.THREADS,),
            (squares, wa, b, aat, n, np.int32(rows), np.int32(rank), np.float64(s)),
        )
        return n

    def output(
        self,
        u: Array,
        b: Array,
        y: Array,
        bias: Array | None,
        m: Array,
        n: Array,
        s: float,
        out: Array | None = None,
        direction: Array | None = None,
    ) -> tuple[Array, Array]:
        """(Y', D): D = Y − b + s U Bᵀ and Y' = b + g ⊙ D with g = m / n (1 where n = 0), in one pass (into
        ``out`` and ``direction``, contiguous arrays shaped as Y, where given)."""
        cupy = _cp()

        y, b = cupy.ascontiguousarray(y), cupy.ascontiguousarray(b)
        tokens, columns = y.shape
        rank = u.shape[1]
        out = cupy.empty_like(y) if out is None else out
        direction = cupy.empty_like(y) if direction is None else direction
        kernel("dora", f"dora_output_{suffix(y.dtype)}")(
            planning.expand_grid(tokens, columns),
            (planning.THREADS,),
            (cupy.ascontiguousarray(u), np.int64(rank), b, y, np.int64(columns),
             null() if bias is None else cupy.ascontiguousarray(bias), cupy.ascontiguousarray(m).ravel(),
             cupy.ascontiguousarray(n, dtype=accumulation(y.dtype)), out, direction, np.int32(tokens),
             np.int32(columns), np.int32(rank), np.float64(s)),
        )  # fmt: skip
        return out, direction
