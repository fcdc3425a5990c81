"""Runs the CuPy backend's CUDA sources on the CPU: each kernel compiled by g++ as C++, every CUDA thread of a
block an OS thread (``__syncthreads`` a ``std::barrier``, warp shuffles through a per-warp buffer, atomics under
a lock), blocks one after another. It checks what the sources compute and how they index (tiles, bounds, strides,
segments), the part a compile check cannot see; it says nothing about speed, the GPU's memory model or
NVRTC. Used by tests/test_cuda_emulated.py; needs g++ with C++20.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import types
from pathlib import Path
from typing import Any

import numpy as np

from peftdecl_cupy import _modules

HEADER = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
using std::min;
using std::sqrt;
struct emu_dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
struct emu_block {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<double> exchange;
    explicit emu_block(unsigned threads) : all(new std::barrier<>(threads)), exchange(threads) {
        for (unsigned w = 0; w * 32 < threads; ++w)
            warps.emplace_back(new std::barrier<>(std::min(32u, threads - 32 * w)));
    }
};
thread_local emu_block* emu_current = nullptr;
inline void __syncthreads() { emu_current->all->arrive_and_wait(); }
template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    emu_current->exchange[threadIdx.x] = double(v);
    emu_current->warps[warp]->arrive_and_wait();
    const T out = (lane + offset < 32 && threadIdx.x + offset < blockDim.x)
        ? T(emu_current->exchange[threadIdx.x + offset]) : v;
    emu_current->warps[warp]->arrive_and_wait();
    return out;
}
inline std::mutex emu_atomic;
template <typename T>
T atomicAdd(T* p, T v) { std::lock_guard<std::mutex> g(emu_atomic); T old = *p; *p = old + v; return old; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
"""

LAUNCHER = r"""
template <typename... P, std::size_t... I>
void emu_call(void (*fn)(P...), void** args, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}
template <typename... P>
void emu_launch(void (*fn)(P...), unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** args) {
    blockDim = {bx, 1, 1};
    gridDim = {gx, gy, gz};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                emu_block block(bx);
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < bx; ++t)
                    threads.emplace_back([&, t, x, y, z] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        emu_current = &block;
                        emu_call(fn, args, std::index_sequence_for<P...>{});
                        block.warps[t / 32]->arrive_and_drop();  // an exited thread no longer holds barriers
                        block.all->arrive_and_drop();
                    });
                for (auto& thread : threads) thread.join();
            }
}
#define EMU_EXPORT(NAME) \
    extern "C" void emu_##NAME(unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** args) { \
        emu_launch(NAME, gx, gy, gz, bx, args); \
    }
"""

ENTRY = re.compile(r"^PD_\w+_ENTRIES\((\w+), \w+\)$", re.MULTILINE)
NAME = re.compile(r"(\w+)_##SUFFIX\(")


def available() -> str | None:
    """None when g++ is there, else why the emulated tests skip."""
    return None if shutil.which("g++") else "g++ not found (the CUDA emulator compiles the sources as C++)"


def entry_points(source: str) -> list[str]:
    """Every ``extern "C"`` kernel of an expanded module: its macro's names times the suffixes it is expanded with."""
    return [f"{name}_{suffix}" for suffix in ENTRY.findall(source) for name in NAME.findall(source)]


def build(module: str, folder: Path) -> ctypes.CDLL:
    """Module ``module`` compiled for the emulator into ``folder``."""
    source = _modules.module_source(module)
    exports = "\n".join(f"EMU_EXPORT({name})" for name in entry_points(source))
    cpp = folder / f"{module}.cpp"
    cpp.write_text(HEADER + source + LAUNCHER + exports + "\n")
    library = folder / f"lib{module}.so"
    command = ["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w", str(cpp), "-o", str(library)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(library))


def _argument(value: Any) -> Any:
    # what CuPy would pack: an array's address, and each NumPy scalar at its own width
    if isinstance(value, np.ndarray):
        return ctypes.c_void_p(value.ctypes.data)
    kinds = {
        np.int32: ctypes.c_int32,
        np.int64: ctypes.c_int64,
        np.uint64: ctypes.c_uint64,
        np.float64: ctypes.c_double,
    }
    return kinds[type(value)](value)


class EmulatedKernel:
    """A ``cupy.RawKernel`` stand-in: ``kernel(grid, block, args)`` runs the emulated entry point."""

    def __init__(self, library: ctypes.CDLL, entry: str) -> None:
        self.function = getattr(library, f"emu_{entry}")
        self.function.restype = None

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        grid = (*grid, 1, 1)[:3]
        values = [_argument(a) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        self.function(*(ctypes.c_uint(g) for g in grid), ctypes.c_uint(block[0]), pointers)


def numpy_as_cupy() -> types.ModuleType:
    """A ``cupy`` stand-in over NumPy with what the backend's kernel wrappers call (host arrays for device ones)."""
    shim = types.ModuleType("cupy")
    for name in (
        "empty",
        "empty_like",
        "zeros",
        "asarray",
        "ascontiguousarray",
        "concatenate",
        "ndarray",
        "array",
    ):
        setattr(shim, name, getattr(np, name))
    shim.asnumpy = np.asarray  # type: ignore[attr-defined]
    return shim
