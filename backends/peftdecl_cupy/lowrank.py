"""Launches of ``kernels/lora.cu`` on CuPy arrays: the low-rank products behind LoRA, AdaLoRA and DoRA.

Every small matrix is read through its strides, so a transposed view is passed as it is (``b.T``); U and the
workspaces are in the accumulation type (float32 for float32 and bfloat16, float64 for float64). bfloat16
arrays are ``uint16`` arrays holding the bits (CuPy has no bfloat16 dtype).
"""

from __future__ import annotations

import itertools
from functools import cache
from typing import Any

import numpy as np

from peftdecl_cupy import planning
from peftdecl_cupy._modules import kernel

_SUFFIXES = {"float32": "f32", "float64": "f64", "uint16": "bf16"}

Array = Any  # cupy.ndarray (CuPy ships no type stubs for its arrays)


def suffix(dtype: object) -> str | None:
    """The kernels' entry-point suffix of an element type, None where there is no kernel for it."""
    return _SUFFIXES.get(np.dtype(dtype).name)  # type: ignore[call-overload]


def accumulation(dtype: object) -> np.dtype[Any]:
    """float64 for float64 arrays, float32 otherwise."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)  # type: ignore[call-overload]


def strides(a: Array) -> tuple[np.int64, np.int64]:
    """A 2-D array's strides in elements, as the kernels' ``long long`` arguments."""
    return np.int64(a.strides[0] // a.itemsize), np.int64(a.strides[1] // a.itemsize)


def _cp() -> Any:
    """The array module the launches allocate with: CuPy (a test substitutes NumPy for the CPU emulator)."""
    import cupy

    return cupy


@cache
def multiprocessors() -> int:
    return int(_cp().cuda.Device().attributes["MultiProcessorCount"])


def address(a: Array) -> int:
    """The device address of a CuPy array's data (a NumPy array's host address: the CPU emulator's arrays)."""
    data = a.data
    return int(data.ptr) if hasattr(data, "ptr") else int(a.ctypes.data)


def null() -> Any:
    """A null pointer argument."""
    return np.uint64(0)


def _rows(x: Array) -> Array:
    return x if x.flags.c_contiguous else _cp().ascontiguousarray(x)


class CupyLowRank:
    """The low-rank kernels on CuPy arrays (the ``LowRankKernels`` of :mod:`peftdecl_cupy.table`)."""

    def accepts(self, *arrays: Array) -> bool:
        """True when every array is a CuPy array of one element type with kernels (False without CuPy)."""
        try:
            import cupy
        except ImportError:
            return False
        dtypes = {a.dtype for a in arrays}
        return (
            all(isinstance(a, cupy.ndarray) for a in arrays)
            and len(dtypes) == 1
            and suffix(*dtypes) is not None
        )

    def shrink(
        self,
        x: Array,
        a: Array,
        alpha: float = 1.0,
        rank_scale: Array | None = None,
        out: Array | None = None,
    ) -> Array:
        """U = α · (X Aᵀ) ⊙ e for X [tokens, K] and A [rank, K] (any strides); e per rank or None. ``out``: a
        C-contiguous [tokens, rank] array in the accumulation type to write U into (e.g. torch's memory)."""
        cp = _cp()
        x = _rows(x)
        tokens, k = x.shape
        rank = a.shape[0]
        u = cp.empty((tokens, rank), dtype=accumulation(x.dtype)) if out is None else out
        scale = null() if rank_scale is None else cp.ascontiguousarray(rank_scale, dtype=u.dtype).ravel()
        a_sr, a_sk = strides(a)
        kernel("lora", f"lora_shrink_{suffix(x.dtype)}")(
            planning.shrink_grid(tokens, rank),
            (planning.THREADS,),
            (x, np.int64(k), a, a_sr, a_sk, scale, u, np.int64(rank), np.int32(tokens), np.int32(k),
             np.int32(rank), np.float64(alpha)),
        )  # fmt: skip
        return u

    def shrink_stacked(self, x: Array, matrices: list[Array], alpha: float = 1.0) -> list[Array]:
        """[X A_iᵀ for each A_i] from one shrink of X against the A_i stacked (q, k and v reading one input):
        X is read once; each result is a column slice of one U."""
        cp = _cp()
        u = self.shrink(x, cp.concatenate([cp.asarray(a) for a in matrices], axis=0), alpha)
        bounds = np.cumsum([0, *(a.shape[0] for a in matrices)])
        return [u[:, lo:hi] for lo, hi in itertools.pairwise(bounds.tolist())]

    def expand(self, u: Array, b: Array, y: Array, alpha: float = 1.0, accumulate: bool = True) -> Array:
        """Y ← [Y +] α · U Bᵀ in place, for U [tokens, rank], B [N, rank] (any strides), Y [tokens, N]
        C-contiguous; returns Y."""
        if not y.flags.c_contiguous:
            raise ValueError("expand writes into a C-contiguous output")
        tokens, n = y.shape
        rank = u.shape[1]
        b_sn, b_sr = strides(b)
        kernel("lora", f"lora_expand_{suffix(y.dtype)}")(
            planning.expand_grid(tokens, n),
            (planning.THREADS,),
            (_rows(u), np.int64(rank), b, b_sn, b_sr, y, np.int64(n), np.int32(tokens), np.int32(n),
             np.int32(rank), np.float64(alpha), np.int32(accumulate)),
        )  # fmt: skip
        return y

    def outer(
        self,
        u: Array,
        x: Array,
        out: Array,
        alpha: float = 1.0,
        accumulate: bool = False,
        workspace: Array | None = None,
    ) -> Array:
        """G ← [G +] α · Uᵀ X into ``out`` [rank, N] (any strides, e.g. ``dB.T``), for U [tokens, rank] and
        X [tokens, N]; returns ``out``. ``workspace``: a zeroed C-contiguous [rank, N] array in the accumulation
        type for the partial sums (allocated here when None)."""
        u, x = _rows(u), _rows(x)
        tokens, n = x.shape
        rank = u.shape[1]
        if workspace is None:
            workspace = _cp().zeros((rank, n), dtype=accumulation(x.dtype))
        grid, per_split = planning.outer_grid(tokens, rank, n, multiprocessors())
        kernel("lora", f"lora_outer_{suffix(x.dtype)}")(
            grid,
            (planning.THREADS,),
            (u, np.int64(rank), x, np.int64(n), workspace, np.int32(tokens), np.int32(rank), np.int32(n),
             np.int32(per_split)),
        )  # fmt: skip
        g_sr, g_sn = strides(out)
        kernel("lora", f"lora_finish_{suffix(out.dtype)}")(
            (planning.ceil_div(rank * n, planning.THREADS), 1, 1),
            (planning.THREADS,),
            (
                workspace,
                out,
                g_sr,
                g_sn,
                np.int32(rank),
                np.int32(n),
                np.float64(alpha),
                np.int32(accumulate),
            ),
        )
        return out
