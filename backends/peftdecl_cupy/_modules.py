"""The CUDA sources of this backend and their compiled modules: one ``kernels/<name>.cu`` per module.

A source may ``#include "<file>.cuh"`` from the same folder; the include is expanded here, so what is compiled
(and hashed for the cache) is one self-contained text, the same for NVRTC at run time and for the compile check
(:mod:`peftdecl_cupy.compile_check`). Sources use no system headers, so NVRTC needs no host toolchain. Kernels
are ``extern "C"`` (one entry point per element type, e.g. ``lora_shrink_f32``), so a module needs no
name expressions and ``nvcc -cubin`` compiles every entry point.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import cupy

KERNEL_DIR = Path(__file__).parent / "kernels"
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17",)
"""NVRTC options of every module (nvcc takes the same); no fast math, so that float32 results match the float64
reference to 1e-5."""

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_LOADED: dict[tuple[int, str, str], Any] = {}  # (device id, module name, source hash) -> cupy.RawModule
_FUNCTIONS: dict[tuple[int, str, str], Any] = {}  # (device id, module name, entry point) -> cupy.RawKernel


def kernel_sources() -> list[Path]:
    """Every ``.cu`` source of the backend, sorted by name (headers ``.cuh`` are compiled inside them)."""
    return sorted(KERNEL_DIR.glob("*.cu"))


def module_source(name: str) -> str:
    """The text compiled for module ``name``: ``kernels/<name>.cu`` with its local includes expanded (each
    header once, like ``#pragma once``)."""
    path = KERNEL_DIR / f"{name}.cu"
    if not path.is_file():
        known = ", ".join(p.stem for p in kernel_sources())
        raise FileNotFoundError(f"no CUDA source {path.name} in {KERNEL_DIR} (modules: {known})")
    return _expand(path, set())


def _expand(path: Path, seen: set[Path]) -> str:
    def include(match: re.Match[str]) -> str:
        header = (path.parent / match.group(1)).resolve()
        if header in seen:
            return f"// {match.group(1)}: already included"
        seen.add(header)
        return f"// ---- {match.group(1)} ----\n{_expand(header, seen)}\n// ---- end {match.group(1)} ----"

    text = path.read_text()
    return _INCLUDE.sub(include, text).replace("#pragma once", "")


def source_hash(name: str) -> str:
    """SHA-256 of the expanded source (part of the cache key: an edited header recompiles its modules)."""
    return hashlib.sha256(module_source(name).encode()).hexdigest()


def load_module(name: str) -> cupy.RawModule:
    """Module ``name`` compiled for the current CUDA device, once per device and source (CuPy also keeps the
    binary in its disk cache, so a new process does not recompile)."""
    import cupy

    device = int(cupy.cuda.runtime.getDevice())
    key = (device, name, source_hash(name))
    module = _LOADED.get(key)
    if module is None:
        module = cupy.RawModule(code=module_source(name), options=COMPILE_OPTIONS, backend="nvrtc")
        module.compile()  # compile now, so a source error shows here and not at the first launch
        _LOADED[key] = module
    return module


def kernel(module: str, entry: str) -> Any:
    """The ``cupy.RawKernel`` of ``extern "C"`` function ``entry`` in ``module``, on the current device; kept
    per device, so a launch costs a dictionary look-up (the source is read and hashed once per device)."""
    import cupy

    key = (int(cupy.cuda.runtime.getDevice()), module, entry)
    found = _FUNCTIONS.get(key)
    if found is None:
        found = _FUNCTIONS[key] = load_module(module).get_function(entry)
    return found
