"""The CuPy backend's host-side planning, without a device: segments, token indices, launch grids and the tile
sizes, against plain loops, a block-by-block coverage count, and the kernels' header."""

from __future__ import annotations

import re

import numpy as np
import pytest

from peftdecl_cupy import planning
from peftdecl_cupy._modules import KERNEL_DIR


def header_defines() -> dict[str, int]:
    text = (KERNEL_DIR / "lowrank_tiles.cuh").read_text() + (KERNEL_DIR / "mixed_batch.cu").read_text()
    return {name: int(value) for name, value in re.findall(r"#define (\w+) (\d+)\s*$", text, re.MULTILINE)}


def test_tile_sizes_match_the_kernels_header() -> None:
    defines = header_defines()
    for name in ("SHRINK_TT", "SHRINK_RT", "SHRINK_KC", "EXPAND_TT", "EXPAND_NT", "EXPAND_RC", "OUTER_TC",
                 "OUTER_RT", "OUTER_NT", "GATHER_MAX_RANK"):  # fmt: skip
        assert getattr(planning, name) == defines[name], name
    assert defines["PD_THREADS"] == planning.THREADS


def loop_segments(index: list[int]) -> list[tuple[int, int, int]]:
    runs, start = [], 0
    for t in range(1, len(index) + 1):
        if t == len(index) or index[t] != index[start]:
            if index[start] >= 0:
                runs.append((start, t, index[start]))
            start = t
    return runs


@pytest.mark.parametrize("seed", range(6))
def test_segments_are_the_runs_of_each_adapter(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.integers(-1, 4, size=rng.integers(1, 12))
    tokens = planning.token_index(rows, int(rng.integers(1, 5)))
    seg = planning.segments(tokens)
    runs = zip(seg.start.tolist(), seg.end.tolist(), seg.adapter.tolist(), strict=True)
    assert list(runs) == loop_segments(tokens.tolist())
    assert seg.longest == max((e - s for s, e, _ in loop_segments(tokens.tolist())), default=0)


def test_token_index_and_adapter_index() -> None:
    index = planning.adapter_index(["b", "__base__", "a", "b", "c"], runs_here=["a", "b"])
    assert index.adapters == ("b", "a") and index.rows.tolist() == [0, -1, 1, 0, -1]
    assert planning.token_index(index.rows, 2).tolist() == [0, 0, -1, -1, 1, 1, 0, 0, -1, -1]
    assert planning.segments(np.array([], dtype=np.int32)).longest == 0


def covered(grid: tuple[int, int, int], tile: tuple[int, int], extent: tuple[int, int]) -> np.ndarray:
    """How often each element of an ``extent`` output is written by a grid of ``tile`` blocks (x, y axes)."""
    count = np.zeros(extent, dtype=int)
    for bx in range(grid[0]):
        for by in range(grid[1]):
            count[bx * tile[0] : (bx + 1) * tile[0], by * tile[1] : (by + 1) * tile[1]] += 1
    return count


@pytest.mark.parametrize(
    ("tokens", "rank", "columns"), [(1, 1, 1), (33, 17, 65), (100, 128, 3), (64, 32, 64)]
)
def test_grids_cover_every_output_once(tokens: int, rank: int, columns: int) -> None:
    shrink = planning.shrink_grid(tokens, rank)
    assert (covered(shrink, (planning.SHRINK_TT, planning.SHRINK_RT), (tokens, rank)) == 1).all()
    expand = planning.expand_grid(tokens, columns)
    assert (covered(expand, (planning.EXPAND_TT, planning.EXPAND_NT), (tokens, columns)) == 1).all()
    # the outer product: blocks over (columns, ranks), the token sum split along z
    (gx, gy, gz), per_split = planning.outer_grid(tokens, rank, columns, multiprocessors=132)
    assert (covered((gx, gy, 1), (planning.OUTER_NT, planning.OUTER_RT), (columns, rank)) == 1).all()
    assert per_split % planning.OUTER_TC == 0 and (gz - 1) * per_split < tokens <= gz * per_split


def test_the_outer_split_fills_the_device_only_when_tiles_are_few() -> None:
    (_, _, many), _ = planning.outer_grid(8192, 16, 64, multiprocessors=132)  # 1 tile: split the tokens
    (_, _, one), _ = planning.outer_grid(8192, 128, 8192, multiprocessors=132)  # 512 tiles already
    assert many >= 132 and one == 1


def test_segmented_grids_cover_each_segment() -> None:
    tokens = planning.token_index(np.array([2, 2, -1, 0, 1]), 40)
    seg = planning.segments(tokens)
    gx, gy, gz = planning.sgmv_shrink_grid(seg, max_rank=40)
    assert (gy, gz) == (3, 2) and gx * planning.SHRINK_TT >= seg.longest == 80
    assert planning.sgmv_expand_grid(seg, 100)[2] == 2
    assert planning.prefer_segments(seg, tokens.size) and not planning.prefer_segments(
        planning.segments(np.arange(8) % 3), 8
    )
