"""The OFT/BOFT, IA3, VeRA, LoHa/LoKr and 4-bit kernel sources run on the CPU (:mod:`tests.kernel_emulator`: g++,
one OS thread per CUDA thread, a barrier for ``__syncthreads``), through the same :mod:`peftdecl_cupy` wrappers
and the same checks the GPU runs (:mod:`tests.cuda_kernel_cases`), on small odd sizes and at the kernels' limits.

This checks the kernels' indexing, tiling, barriers and the wrappers' launch arguments without a GPU; it says
nothing about warp-level behaviour, memory ordering on a device or speed (tests.test_cuda_kernels_other).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import cuda_kernel_cases as cases
from tests import kernel_emulator

if kernel_emulator.compiler() is None:
    pytest.skip("needs g++ to build the kernel sources for the CPU", allow_module_level=True)

DTYPES = ["f32", "bf16"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> kernel_emulator.Emulator:
    return kernel_emulator.Emulator(Path(tmp_path_factory.mktemp("cuda_emulator")))


@pytest.fixture
def xp(emulator: kernel_emulator.Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """NumPy, with the wrappers' launches and allocations sent to the emulator and NumPy."""
    from peftdecl_cupy import delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels

    for module in (delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels):
        monkeypatch.setattr(module, "kernel", emulator.kernel)
        monkeypatch.setattr(module, "_cp", lambda: np)
    yield np


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "n", "b", "shared"), [(37, 3, 5, False), (3, 2, 64, False), (9, 4, 1, True)]
)
@pytest.mark.parametrize("transpose", [False, True])
def test_rotate_blocks(xp: Any, dtype: str, rows: int, n: int, b: int, shared: bool, transpose: bool) -> None:
    cases.check_rotate_blocks(xp, dtype, rows, n, b, shared, transpose)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n", "b"), [(1100, 1, 7), (5, 1, 64)])  # 1100 rows: two row chunks
def test_block_tn(xp: Any, dtype: str, rows: int, n: int, b: int) -> None:
    cases.check_block_tn(xp, dtype, rows, n, b)


@pytest.mark.parametrize("b", [1, 7, 64])
def test_cayley(xp: Any, b: int) -> None:
    cases.check_cayley(xp, b)


@pytest.mark.parametrize(("terms", "b"), [(1, 4), (5, 9), (8, 64)])
def test_neumann(xp: Any, terms: int, b: int) -> None:
    cases.check_neumann(xp, terms, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("width", "blocks", "size", "factors"), [(24, 6, 4, 2), (32, 4, 8, 3), (10, 5, 2, 1)]
)
def test_butterfly(xp: Any, dtype: str, width: int, blocks: int, size: int, factors: int) -> None:
    cases.check_butterfly(xp, dtype, 7, width, blocks, size, factors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d"), [(600, 5), (3, 70)])  # 600 rows: two row chunks of the backward
def test_scale_columns(xp: Any, dtype: str, rows: int, d: int) -> None:
    cases.check_scale_columns(xp, dtype, rows, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols", "rank"), [(70, 33, 19), (1, 5, 1)])
def test_lowrank_add(xp: Any, dtype: str, rows: int, cols: int, rank: int) -> None:
    cases.check_lowrank_add(xp, dtype, rows, cols, rank)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("out_f", "in_f", "r1", "r2"), [(5, 29, 3, 5), (2, 300, 256, 1)])
def test_loha(xp: Any, dtype: str, out_f: int, in_f: int, r1: int, r2: int) -> None:
    cases.check_loha(xp, dtype, out_f, in_f, r1, r2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m1", "n1", "p", "q"), [(3, 4, 5, 7), (1, 1, 20, 17)])
def test_kron(xp: Any, dtype: str, m1: int, n1: int, p: int, q: int) -> None:
    cases.check_kron(xp, dtype, m1, n1, p, q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols", "blocksize", "rank"), [(3, 128, 64, 16), (7, 30, 32, 1)])
def test_nf4(xp: Any, dtype: str, rows: int, cols: int, blocksize: int, rank: int) -> None:
    cases.check_nf4(xp, dtype, rows, cols, blocksize, rank)
