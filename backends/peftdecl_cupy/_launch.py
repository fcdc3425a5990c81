"""Launch helpers shared by the kernel wrappers: entry-point suffixes, grid sizes, scalar and null arguments.

bfloat16 arrays travel as ``uint16`` (CuPy has no bfloat16 dtype; the kernels read the raw bits, common.cuh).
"""

from __future__ import annotations

from typing import Any

import numpy as np

THREADS = 256
NULL = np.uint64(0)
"""A null pointer argument (an optional input the kernel skips)."""

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.uint16): "bf16"}


def suffix(array: Any) -> str:
    """The entry-point suffix of an activation array: ``f32`` (float32) or ``bf16`` (uint16 bits)."""
    try:
        return _SUFFIX[np.dtype(array.dtype)]
    except KeyError:
        raise TypeError(f"no kernel for dtype {array.dtype} (float32, or bfloat16 as uint16)") from None


def supported(dtype: Any) -> bool:
    """Whether an activation dtype has entry points."""
    return np.dtype(dtype) in _SUFFIX


def dense(*arrays: Any) -> tuple[Any, ...]:
    """Row-major (C-contiguous) versions of the arrays: a copy only of one that is not (the kernels index rows by
    their length); None stays None."""
    out = []
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            a = a.copy(order="C")
        out.append(a)
    return tuple(out)


def written(out: Any) -> Any:
    """``out`` itself, checked row-major: a kernel writes its result there in place."""
    if not out.flags.c_contiguous:
        raise ValueError("the output array must be C-contiguous (row-major)")
    return out


def blocks(count: int, per_block: int = THREADS, cap: int = 65535 * 8) -> int:
    """Grid size for ``count`` items at ``per_block`` per block (grid-stride kernels take the cap)."""
    return max(1, min(cap, -(-count // per_block)))


def optional(array: Any | None) -> Any:
    """The array, or a null pointer."""
    return NULL if array is None else array


def i32(value: int) -> Any:
    """A C ``int`` argument."""
    return np.int32(value)


def i64(value: int) -> Any:
    """A C ``long long`` argument."""
    return np.int64(value)


def f32(value: float) -> Any:
    """A C ``float`` argument."""
    return np.float32(value)
