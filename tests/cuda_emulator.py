"""Runs the CuPy backend's CUDA sources on the CPU: each module compiled by g++ as C++, every CUDA thread of a
block an OS thread (``__syncthreads`` a ``std::barrier`` over the block, warp shuffles through a per-warp
exchange buffer, ``atomicAdd`` under a lock), blocks one after another on the same threads, so ``__shared__`` is
a ``static``. Blocks may be 1-, 2- or 3-dimensional; warps are runs of 32 threads in x-fastest order, as on the
GPU.

It checks what the sources compute and how they index (tiles, bounds, strides, segments, barriers), the part a
compile check cannot see; it says nothing about speed, the GPU's memory model, races a barrier hides, or NVRTC.
The kernels are the text NVRTC compiles (:func:`peftdecl_cupy._modules.module_source`). Needs g++ with C++20.

Two ways in: :func:`build` and :class:`EmulatedKernel` (a ``cupy.RawKernel`` stand-in per entry point), or an
:class:`Emulator` whose ``kernel(module, entry)`` has the signature of :func:`peftdecl_cupy._modules.kernel`
and counts launches. Used by tests/test_cuda_emulated.py, tests/test_cuda_kernels_emulated.py,
tests/test_torch_cuda_emulated.py, tests/test_torch_cuda_lowrank_emulated.py, tests/test_torch_cuda_mixed.py and
the dry-run plugin tests/cuda_dry_run.py.
"""

from __future__ import annotations

import collections
import ctypes
import re
import shutil
import subprocess
import types
from collections.abc import Sequence
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
    unsigned threads;
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<unsigned long long> exchange;
    explicit emu_block(unsigned n) : threads(n), all(new std::barrier<>(n)), exchange(n) {
        for (unsigned w = 0; w * 32 < n; ++w)
            warps.emplace_back(new std::barrier<>(std::min(32u, n - 32 * w)));
    }
};
thread_local emu_block* emu_current = nullptr;
thread_local unsigned emu_rank = 0;  // the thread's place in its block, x fastest (its warp: emu_rank / 32)
inline void __syncthreads() { emu_current->all->arrive_and_wait(); }
template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffled value fits the exchange buffer");
    const unsigned lane = emu_rank % 32, warp = emu_rank / 32;
    std::memcpy(&emu_current->exchange[emu_rank], &v, sizeof(T));
    emu_current->warps[warp]->arrive_and_wait();
    T out = v;
    if (lane + offset < 32 && emu_rank + offset < emu_current->threads)
        std::memcpy(&out, &emu_current->exchange[emu_rank + offset], sizeof(T));
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
void emu_launch(void (*fn)(P...), const unsigned* grid, const unsigned* block, void** args) {
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    const unsigned n = block[0] * block[1] * block[2];
    // one OS thread per CUDA thread for the whole launch, running the blocks in turn; between two blocks every
    // thread waits at `next`, whose completion step makes the next block's barriers
    auto current = std::make_unique<emu_block>(n);
    auto fresh = [&]() noexcept { current = std::make_unique<emu_block>(n); };
    std::barrier next(n, fresh);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
            threadIdx = {t % block[0], t / block[0] % block[1], t / (block[0] * block[1])};
            emu_rank = t;
            for (unsigned z = 0; z < grid[2]; ++z)
                for (unsigned y = 0; y < grid[1]; ++y)
                    for (unsigned x = 0; x < grid[0]; ++x) {
                        blockIdx = {x, y, z};
                        emu_current = current.get();
                        emu_call(fn, args, std::index_sequence_for<P...>{});
                        emu_current->warps[t / 32]->arrive_and_drop();  // an exited thread holds no barriers
                        emu_current->all->arrive_and_drop();
                        next.arrive_and_wait();
                    }
        });
    for (auto& thread : threads) thread.join();
}
#define EMU_EXPORT(NAME) \
    extern "C" void emu_##NAME(const unsigned* grid, const unsigned* block, void** args) { \
        emu_launch(NAME, grid, block, args); \
    }
"""

KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')


def available() -> str | None:
    """None when g++ is there, else why the emulated tests skip."""
    return None if shutil.which("g++") else "g++ not found (the CUDA emulator compiles the sources as C++)"


def entry_points(source: str) -> list[str]:
    """Every ``extern "C"`` kernel of an expanded module, its macros expanded by the preprocessor (the sources
    include no system headers, so this needs nothing but ``g++ -E``)."""
    command = ["g++", "-E", "-P", "-x", "c++", "-"]
    expanded = subprocess.run(command, input=source, check=True, capture_output=True, text=True).stdout
    return KERNEL.findall(expanded)


def build(module: str, folder: Path) -> ctypes.CDLL:
    """Module ``module`` compiled for the emulator into ``folder``: entry point ``e`` is ``emu_e``."""
    source = _modules.module_source(module)
    exports = "\n".join(f"EMU_EXPORT({name})" for name in entry_points(source))
    cpp = folder / f"{module}.cpp"
    cpp.write_text(HEADER + source + LAUNCHER + exports + "\n")
    library = folder / f"lib{module}.so"
    command = ["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w", str(cpp), "-o", str(library)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(library))


_SCALARS: dict[type, Any] = {
    np.int32: ctypes.c_int32,
    np.int64: ctypes.c_int64,
    np.uint64: ctypes.c_uint64,  # a null pointer (peftdecl_cupy._launch.NULL) or an address
    np.float32: ctypes.c_float,
    np.float64: ctypes.c_double,
}


def _argument(value: Any) -> Any:
    # what CuPy would pack: an array's address, and each NumPy scalar at its own width (the launcher reads each
    # parameter at its declared type, so a wrapper passing the wrong width reads garbage here as on the GPU)
    if isinstance(value, np.ndarray):
        return ctypes.c_void_p(value.ctypes.data)
    kind = _SCALARS.get(type(value))
    if kind is None:
        raise TypeError(
            f"kernel argument of type {type(value).__name__} (CuPy takes arrays and NumPy scalars)"
        )
    return kind(value)


def _dims(value: int | Sequence[int]) -> Any:
    dims = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    return (ctypes.c_uint * 3)(*dims, *(1,) * (3 - len(dims)))


class EmulatedKernel:
    """A ``cupy.RawKernel`` stand-in: ``kernel(grid, block, args)`` runs the emulated entry point (grid and block
    an int or up to three sizes; ``shared_mem`` is accepted and unused: the sources size their shared arrays)."""

    def __init__(
        self, library: ctypes.CDLL, entry: str, launches: collections.Counter[str] | None = None
    ) -> None:
        self.entry = entry
        self.function = getattr(library, f"emu_{entry}")
        self.function.restype = None
        self.launches = launches

    def __call__(
        self, grid: int | Sequence[int], block: int | Sequence[int], args: Sequence[Any], shared_mem: int = 0
    ) -> None:
        if self.launches is not None:
            self.launches[self.entry] += 1
        values = [_argument(a) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        self.function(_dims(grid), _dims(block), pointers)


class Emulator:
    """Modules built on first use into ``build_dir``; ``kernel(module, entry)`` has the signature of
    :func:`peftdecl_cupy._modules.kernel` and works on NumPy arrays; ``launches`` counts launches per entry."""

    def __init__(self, build_dir: Path) -> None:
        self._dir = build_dir
        self._libraries: dict[str, ctypes.CDLL] = {}
        self.launches: collections.Counter[str] = collections.Counter()
        """Launches per entry point."""

    def library(self, module: str) -> ctypes.CDLL:
        if module not in self._libraries:
            self._libraries[module] = build(module, self._dir)
        return self._libraries[module]

    def kernel(self, module: str, entry: str) -> EmulatedKernel:
        return EmulatedKernel(self.library(module), entry, self.launches)


def numpy_as_cupy() -> types.ModuleType:
    """A ``cupy`` stand-in over NumPy with what the backend's kernel wrappers call (host arrays for device ones)."""
    shim = types.ModuleType("cupy")
    for name in (
        "empty",
        "empty_like",
        "full",
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
