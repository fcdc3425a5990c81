"""Host-side planning of the kernels' launches, in NumPy: tile sizes, grids, and the mixed-batch tables.

The tile sizes mirror the ``#define``s of ``kernels/lowrank_tiles.cuh`` (a test reads them from the header).
Mixed batches: ``adapter_names`` gives each batch row an adapter or ``"__base__"``; the rows' tokens become a
per-token adapter index (-1: none) for the gathered kernels, or segments (maximal runs of consecutive tokens
on one adapter; base runs dropped) for the segmented ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

THREADS = 256
SHRINK_TT, SHRINK_RT, SHRINK_KC = 32, 32, 32
EXPAND_TT, EXPAND_NT, EXPAND_RC = 32, 64, 32
OUTER_TC, OUTER_RT, OUTER_NT = 32, 32, 64
GATHER_MAX_RANK = 256
ROWS_PER_NORM_BLOCK = THREADS // 32

Grid = tuple[int, int, int]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shrink_grid(tokens: int, rank: int) -> Grid:
    """U [tokens, rank]: one block per tile of 32 tokens × 32 ranks."""
    return (ceil_div(tokens, SHRINK_TT), ceil_div(rank, SHRINK_RT), 1)


def expand_grid(tokens: int, columns: int) -> Grid:
    """Y [tokens, columns]: one block per tile of 32 tokens × 64 columns."""
    return (ceil_div(tokens, EXPAND_TT), ceil_div(columns, EXPAND_NT), 1)


def outer_grid(tokens: int, rank: int, columns: int, multiprocessors: int) -> tuple[Grid, int]:
    """(grid, tokens per split) of G [rank, columns] = Σ_t U[t]ᵀ X[t]: the token sum is split over the grid's
    z axis until there are about two blocks per multiprocessor (each split a multiple of 32 tokens)."""
    tiles = ceil_div(columns, OUTER_NT) * ceil_div(rank, OUTER_RT)
    wanted = max(1, min(ceil_div(2 * multiprocessors, tiles), ceil_div(max(tokens, 1), OUTER_TC)))
    per_split = ceil_div(ceil_div(max(tokens, 1), wanted), OUTER_TC) * OUTER_TC
    return (
        ceil_div(columns, OUTER_NT),
        ceil_div(rank, OUTER_RT),
        ceil_div(max(tokens, 1), per_split),
    ), per_split


def norm_grid(rows: int) -> Grid:
    """DoRA's row norm: one warp per row, 8 rows per block."""
    return (ceil_div(rows, ROWS_PER_NORM_BLOCK), 1, 1)


@dataclass(frozen=True)
class AdapterIndex:
    """Which adapter each batch row runs: ``adapters`` (first-appearance order, only those that adapt the layer)
    and ``rows`` (index into ``adapters`` per batch row, -1 for none)."""

    adapters: tuple[str, ...]
    rows: np.ndarray


def adapter_index(names: Sequence[str], runs_here: Sequence[str]) -> AdapterIndex:
    """Per-row indices of ``names``; a name not in ``runs_here`` (``"__base__"``, or an adapter that does not
    target this layer) is -1."""
    here = set(runs_here)
    adapters = tuple(n for n in dict.fromkeys(names) if n in here)
    position = {n: i for i, n in enumerate(adapters)}
    return AdapterIndex(adapters, np.array([position.get(n, -1) for n in names], dtype=np.int32))


def token_index(rows: np.ndarray, tokens_per_row: int) -> np.ndarray:
    """The per-token adapter index of a batch whose rows hold ``tokens_per_row`` tokens each (row-major)."""
    return np.repeat(np.asarray(rows, dtype=np.int32), tokens_per_row)


@dataclass(frozen=True)
class Segments:
    """Runs of consecutive tokens on one adapter: tokens ``start[i] <= t < end[i]`` run ``adapter[i]``."""

    start: np.ndarray
    end: np.ndarray
    adapter: np.ndarray

    @property
    def longest(self) -> int:
        return int((self.end - self.start).max()) if len(self.start) else 0


def segments(tokens: np.ndarray) -> Segments:
    """The maximal runs of equal index in the per-token ``tokens``, runs of -1 (no adapter) left out."""
    tokens = np.asarray(tokens, dtype=np.int32)
    if tokens.size == 0:
        empty = np.zeros(0, dtype=np.int32)
        return Segments(empty, empty, empty)
    boundary = np.flatnonzero(np.diff(tokens)) + 1
    start = np.concatenate([[0], boundary]).astype(np.int32)
    end = np.concatenate([boundary, [tokens.size]]).astype(np.int32)
    adapter = tokens[start]
    keep = adapter >= 0
    return Segments(start[keep], end[keep], adapter[keep])


def sgmv_shrink_grid(seg: Segments, max_rank: int) -> Grid:
    """(token tiles of the longest segment, segments, rank tiles of the largest rank)."""
    return (ceil_div(seg.longest, SHRINK_TT), len(seg.start), ceil_div(max_rank, SHRINK_RT))


def sgmv_expand_grid(seg: Segments, columns: int) -> Grid:
    """(token tiles of the longest segment, segments, column tiles)."""
    return (ceil_div(seg.longest, EXPAND_TT), len(seg.start), ceil_div(columns, EXPAND_NT))


def bgmv_expand_grid(tokens: int, columns: int) -> Grid:
    """One block per token and 256 columns."""
    return (tokens, ceil_div(columns, THREADS), 1)


def prefer_segments(seg: Segments, tokens: int) -> bool:
    """Segmented kernels when segments average at least one token tile (prefill); gathered ones otherwise."""
    return len(seg.start) > 0 and tokens >= SHRINK_TT * len(seg.start)
