"""4-bit (NF4/FP4) dequantisation on CuPy arrays in bitsandbytes' layout (``kernels/nf4.cu``), alone or fused
with a LoRA update: W' = dequant(W) + s · B A in one pass, the dense W never stored on its own.

Element e of the row-major weight is nibble ``codes[e // 2] >> 4`` (even e) or ``& 15`` (odd e), worth
``table[nibble] · absmax[e // blocksize]``; with double quantisation the absmax bytes are first decoded as
``code2[q] · absmax2[i // blocksize2] + offset`` (:func:`absmax_dequant`). Outputs float32 or bfloat16 (uint16).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl_cupy._launch import THREADS, blocks, dense, f32, i32, i64, suffix, written
from peftdecl_cupy._modules import kernel

MAX_RANK = 256


def _cp() -> Any:
    import cupy

    return cupy


def absmax_dequant(q: Any, code2: Any, absmax2: Any, offset: float, blocksize2: int, out: Any = None) -> Any:
    """The float32 block scales of a double-quantised weight."""
    q, code2, absmax2 = dense(q, code2, absmax2)
    n = q.shape[0]
    out = _cp().empty(n, dtype=np.float32) if out is None else written(out)
    kernel("nf4", "absmax_dequant")(
        (blocks(n),), (THREADS,), (q, code2, absmax2, f32(offset), out, i64(n), i32(blocksize2))
    )
    return out


def nf4_dequant(codes: Any, absmax: Any, table: Any, blocksize: int, out: Any) -> Any:
    """``out`` (float32 or uint16 bfloat16, any shape of n elements) ← the dequantised weight."""
    codes, absmax, table = dense(codes, absmax, table)
    n = written(out).size
    kernel("nf4", f"nf4_dequant_{suffix(out)}")(
        (blocks(n),), (THREADS,), (codes, absmax, table, out, i64(n), i32(blocksize))
    )
    return out


def nf4_lowrank(
    codes: Any, absmax: Any, table: Any, blocksize: int, b: Any, a: Any, scale: float, out: Any
) -> Any:
    """``out`` [rows, cols] ← dequant(W) + s · b a, b [rows, r] and a [r, cols] float32 (contiguous)."""
    codes, absmax, table, b, a = dense(codes, absmax, table, b, a)
    rows, cols = written(out).shape
    if rows > 65535 or b.shape[1] > MAX_RANK:
        raise ValueError(f"nf4_lowrank: {rows} rows (at most 65535, one grid row each), rank {b.shape[1]}")
    kernel("nf4", f"nf4_lowrank_{suffix(out)}")(
        (blocks(cols), rows),
        (THREADS,),
        (codes, absmax, table, i32(blocksize), b, a, f32(scale), out, i64(cols), i32(b.shape[1])),
    )
    return out
