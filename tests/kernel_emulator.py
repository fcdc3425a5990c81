"""Run the CUDA kernel sources on the CPU: each ``.cu`` compiled by g++ as C++ with one OS thread per CUDA thread.

For the GPU-less checks of the OFT/BOFT/IA3/VeRA/LoHa/LoKr/4-bit kernels' indexing, tiling and barriers
(:mod:`tests.test_cuda_kernels_emulated`); the LoRA/mixed-batch/DoRA sources have their own (tests.cuda_emulator).
``__shared__`` becomes ``static`` (blocks run one at a time, so a block's threads share it), ``__syncthreads``
a ``std::barrier`` over the block's threads, ``atomicAdd`` a locked add; threadIdx/blockIdx are thread-local.
What this cannot show: warp-level behaviour (``__shfl``), races the barrier hides, and speed. The kernels are the
same text NVRTC compiles (:func:`peftdecl_cupy._modules.module_source`).
"""

from __future__ import annotations

import collections
import ctypes
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PRELUDE = r"""
#include <barrier>
#include <cstring>
#include <mutex>
struct emu_dim3 { unsigned int x, y, z; };
thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
static std::barrier<>* emu_barrier = nullptr;
static std::mutex emu_atomic;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
template <typename T> T atomicAdd(T* p, T v) {
    std::lock_guard<std::mutex> g(emu_atomic);
    T old = *p;
    *p = old + v;
    return old;
}
template <typename T> T __shfl_down_sync(unsigned int, T v, int) { return v; }  // warps are not emulated
extern "C" void emu_block(unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by,
                          unsigned int bz) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    delete emu_barrier;
    emu_barrier = new std::barrier<>(bx * by * bz);
}
extern "C" void emu_thread(unsigned int tx, unsigned int ty, unsigned int tz, unsigned int bx, unsigned int by,
                           unsigned int bz) {
    threadIdx = {tx, ty, tz};
    blockIdx = {bx, by, bz};
}
"""


def compiler() -> str | None:
    return shutil.which("g++")


def _c_arg(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, np.int32):
        return ctypes.c_int32(int(value))
    if isinstance(value, np.int64):
        return ctypes.c_int64(int(value))
    if isinstance(value, np.float32):
        return ctypes.c_float(float(value))
    if isinstance(value, np.uint64):  # a null pointer (peftdecl_cupy._launch.NULL)
        return ctypes.c_void_p(int(value) or None)
    raise TypeError(f"kernel argument of type {type(value).__name__}")


def _dims(value: int | Sequence[int]) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    return (*dims, *(1,) * (3 - len(dims)))  # type: ignore[return-value]


class Emulator:
    """``kernel(module, entry)`` with the signature of :func:`peftdecl_cupy._modules.kernel`, on NumPy arrays."""

    def __init__(self, build_dir: Path) -> None:
        self._dir = build_dir
        self._libraries: dict[str, ctypes.CDLL] = {}
        self.launches: collections.Counter[str] = collections.Counter()
        """Launches per entry point."""

    def library(self, module: str) -> ctypes.CDLL:
        if module not in self._libraries:
            from peftdecl_cupy._modules import module_source

            source = self._dir / f"{module}.cpp"
            source.write_text(PRELUDE + module_source(module))
            target = self._dir / f"{module}.so"
            command = [compiler() or "g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w"]
            subprocess.run(
                [*command, str(source), "-o", str(target)], check=True, capture_output=True, text=True
            )
            self._libraries[module] = ctypes.CDLL(str(target))
        return self._libraries[module]

    def kernel(self, module: str, entry: str) -> Callable[..., None]:
        lib = self.library(module)
        function = getattr(lib, entry)
        function.restype = None

        def launch(grid: Any, block: Any, args: Sequence[Any], shared_mem: int = 0) -> None:
            self.launches[entry] += 1
            g, b = _dims(grid), _dims(block)
            c_args = [_c_arg(a) for a in args]
            for bz in range(g[2]):
                for by in range(g[1]):
                    for bx in range(g[0]):
                        lib.emu_block(*g, *b)
                        threads = [
                            threading.Thread(
                                target=self._run, args=(lib, function, (tx, ty, tz, bx, by, bz), c_args)
                            )
                            for tz in range(b[2])
                            for ty in range(b[1])
                            for tx in range(b[0])
                        ]
                        for t in threads:
                            t.start()
                        for t in threads:
                            t.join()

        return launch

    @staticmethod
    def _run(lib: ctypes.CDLL, function: Any, ids: tuple[int, ...], c_args: list[Any]) -> None:
        lib.emu_thread(*ids)
        function(*c_args)
