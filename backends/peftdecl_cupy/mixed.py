"""Launches of ``kernels/mixed_batch.cu``: a batch whose tokens run different LoRA adapters (or none).

The host plans (:mod:`peftdecl_cupy.planning`): per-token adapter indices, then segments when they are long
enough to fill token tiles (prefill), the gathered kernels otherwise (decode). The adapters' tables (device
addresses of each A and B, ranks, scales) are uploaded per call; A and B are made C-contiguous first and kept
alive until the launches are queued.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl_cupy import planning
from peftdecl_cupy._modules import kernel
from peftdecl_cupy.lowrank import CupyLowRank, accumulation, address, suffix

Array = Any
MAX_SEGMENTS = 65535  # the grid's y extent


def _cp() -> Any:
    import cupy

    return cupy


def _segmented(index: Any) -> planning.Segments | None:
    """The segments :meth:`CupyMixed.run` launches the segmented (prefill) kernels over, or None where it takes
    the gathered (decode) ones."""
    index = np.asarray(index)
    seg = planning.segments(index)
    if planning.prefer_segments(seg, int(index.shape[0])) and len(seg.start) <= MAX_SEGMENTS:
        return seg
    return None


def gathered(index: Any) -> bool:
    """Whether :meth:`CupyMixed.run` takes the gathered kernels for this per-token index (-1: no adapter); they
    take ranks up to :data:`peftdecl_cupy.planning.GATHER_MAX_RANK`, the segmented ones any rank."""
    return _segmented(index) is None


class CupyMixed:
    """The mixed-batch kernels on CuPy arrays (the ``MixedKernels`` of :mod:`peftdecl_cupy.table`)."""

    def accepts(self, *arrays: Array) -> bool:
        return CupyLowRank().accepts(*arrays)

    def run(self, x: Array, y: Array, adapters: list[tuple[Array, Array, float]], index: Any) -> Array:
        """Y[t] += s_i (X[t] A_iᵀ) B_iᵀ in place for i = index[t] >= 0; X [tokens, K], Y [tokens, N]."""
        cupy = _cp()
        x = cupy.ascontiguousarray(x)
        tokens, k = x.shape
        n = y.shape[1]
        a_list = [cupy.ascontiguousarray(a) for a, _, _ in adapters]
        b_list = [cupy.ascontiguousarray(b) for _, b, _ in adapters]
        ranks_host = np.array([a.shape[0] for a in a_list], dtype=np.int32)
        max_rank = int(ranks_host.max())
        a_ptrs = cupy.asarray(np.array([address(a) for a in a_list], dtype=np.uint64))
        b_ptrs = cupy.asarray(np.array([address(b) for b in b_list], dtype=np.uint64))
        ranks = cupy.asarray(ranks_host)
        scales = cupy.asarray(np.array([s for _, _, s in adapters], dtype=np.float64))
        u = cupy.empty((tokens, max_rank), dtype=accumulation(x.dtype))
        name = suffix(x.dtype)
        seg = _segmented(index)
        if seg is not None:
            start, end, owner = (cupy.asarray(v) for v in (seg.start, seg.end, seg.adapter))
            kernel("mixed_batch", f"sgmv_shrink_{name}")(
                planning.sgmv_shrink_grid(seg, max_rank),
                (planning.THREADS,),
                (x, np.int64(k), a_ptrs, ranks, start, end, owner, u, np.int64(max_rank), np.int32(k)),
            )
            kernel("mixed_batch", f"sgmv_expand_{name}")(
                planning.sgmv_expand_grid(seg, n),
                (planning.THREADS,),
                (
                    u,
                    np.int64(max_rank),
                    b_ptrs,
                    ranks,
                    scales,
                    start,
                    end,
                    owner,
                    y,
                    np.int64(n),
                    np.int32(n),
                ),
            )
            return y
        if max_rank > planning.GATHER_MAX_RANK:
            raise ValueError(
                f"gathered mixed batches take ranks up to {planning.GATHER_MAX_RANK}, not {max_rank}"
            )
        token_adapter = cupy.asarray(np.asarray(index, dtype=np.int32))
        kernel("mixed_batch", f"bgmv_shrink_{name}")(
            (tokens, 1, 1),
            (planning.THREADS,),
            (x, np.int64(k), a_ptrs, ranks, token_adapter, u, np.int64(max_rank), np.int32(k)),
        )
        kernel("mixed_batch", f"bgmv_expand_{name}")(
            planning.bgmv_expand_grid(tokens, n),
            (planning.THREADS,),
            (u, np.int64(max_rank), b_ptrs, ranks, scales, token_adapter, y, np.int64(n), np.int32(n)),
        )
        return y
