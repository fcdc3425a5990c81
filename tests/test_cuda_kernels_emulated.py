"""The OFT/BOFT, IA3, VeRA, LoHa/LoKr and 4-bit kernel sources run on the CPU (:mod:`tests.cuda_emulator`: g++,
one OS thread per CUDA thread, a per-block barrier for ``__syncthreads``, warps emulated), through the same
:mod:`peftdecl_cupy` wrappers and the same checks the GPU runs (:mod:`tests.cuda_kernel_cases`), on small odd sizes
and at the kernels' limits.

This checks the kernels' indexing, tiling, barriers and the wrappers' launch arguments without a GPU; it says
nothing about memory ordering on a device or speed (tests.test_cuda_kernels_other).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import cuda_emulator
from tests import cuda_kernel_cases as cases

if cuda_emulator.available():
    pytest.skip(str(cuda_emulator.available()), allow_module_level=True)

DTYPES = ["f32", "bf16"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> cuda_emulator.Emulator:
    return cuda_emulator.Emulator(Path(tmp_path_factory.mktemp("cuda_emulator")))


@pytest.fixture
def xp(emulator: cuda_emulator.Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
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


# -- launch arguments against the compiled signatures ------------------------------------------------------------
MODULES = ("oft", "boft", "ia3", "vera", "loha", "lokr", "nf4")


def _ptx_type(value: Any) -> str:
    """The PTX parameter type CuPy packs an argument as: an array's address and 64-bit integers as u64."""
    if isinstance(value, np.int32):
        return "u32"
    if isinstance(value, np.float32):
        return "f32"
    assert isinstance(value, (np.ndarray, np.int64, np.uint64)), type(value)
    return "u64"


def _launch_everything(dtype: Any) -> None:
    """Every wrapper once, on tiny arrays of ``dtype`` (float32 or uint16 bfloat16 bits)."""
    from peftdecl_cupy import delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels

    act = np.zeros((4, 8), dtype)
    r = np.zeros((2, 4, 4), np.float32)
    idx = np.arange(8, dtype=np.int32)
    rotation_kernels.rotate_blocks(act, r)
    rotation_kernels.block_tn(act, act, 4)
    rotation_kernels.butterfly_factor(act, r, idx)
    rotation_kernels.butterfly_factor_tn(act, act, idx, 4)
    scaling_kernels.scale_columns(act, np.zeros(8, np.float32))
    scaling_kernels.scale_columns_backward(act, act, np.zeros(8, np.float32))
    p, q = np.zeros((4, 3), np.float32), np.zeros((3, 8), np.float32)
    scaling_kernels.lowrank_add(act, p, q, sk=np.zeros(3, np.float32), out=act)
    a, b = np.zeros((4, 3), dtype), np.zeros((3, 8), dtype)
    delta_kernels.loha_delta(a, b, a, b, 1.0)
    delta_kernels.loha_backward(act, a, b, a, b, 1.0)
    delta_kernels.kron_delta(np.zeros((2, 2), dtype), np.zeros((2, 4), dtype), 1.0)
    delta_kernels.kron_backward(act, np.zeros((2, 2), dtype), np.zeros((2, 4), dtype), 1.0)
    codes, absmax, table = np.zeros(16, np.uint8), np.zeros(1, np.float32), np.zeros(16, np.float32)
    nf4_kernels.nf4_dequant(codes, absmax, table, 64, np.zeros((4, 8), dtype))
    nf4_kernels.nf4_lowrank(codes, absmax, table, 64, p, q, 1.0, np.zeros((4, 8), dtype))
    if dtype == np.float32:  # float32-only entry points
        rotation_kernels.skew_solve(r, r)
        rotation_kernels.neumann(r, (1.0, 2.0, 1.0))
        nf4_kernels.absmax_dequant(codes, np.zeros(256, np.float32), absmax, 0.0, 256)


def test_launch_arguments_match_the_compiled_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every entry point of these modules is launched by a wrapper with arguments of the widths its PTX declares
    (CuPy packs arguments by their NumPy types: a width mismatch shifts every later argument on the GPU, which the
    emulator's C calls would not show)."""
    import re
    import subprocess

    from peftdecl_cupy import _modules, delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels
    from peftdecl_cupy.compile_check import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or the nvidia-cuda-nvcc wheel)")
    declared: dict[str, list[str]] = {}
    for module in MODULES:
        source, ptx = tmp_path / f"{module}.cu", tmp_path / f"{module}.ptx"
        source.write_text(_modules.module_source(module))
        command = [nvcc, *_modules.COMPILE_OPTIONS, "--ptx", "-arch=sm_80", str(source), "-o", str(ptx)]
        subprocess.run(command, check=True, capture_output=True)
        for name, body in re.findall(r"\.entry (\w+)\(([^)]*)\)", ptx.read_text()):
            declared[name] = re.findall(r"\.param \.(\w+)", body)
    launched: dict[str, list[str]] = {}

    def record(module: str, entry: str) -> Any:
        def launch(grid: Any, block: Any, args: Any, shared_mem: int = 0) -> None:
            launched[entry] = [_ptx_type(a) for a in args]

        return launch

    for wrappers in (delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels):
        monkeypatch.setattr(wrappers, "kernel", record)
        monkeypatch.setattr(wrappers, "_cp", lambda: np)
    _launch_everything(np.float32)
    _launch_everything(np.uint16)
    assert set(launched) == set(declared), (set(declared) - set(launched), set(launched) - set(declared))
    for entry, types in launched.items():
        assert types == declared[entry], entry
