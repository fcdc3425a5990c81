"""Compile every CUDA source of the backend for the given architectures, without a GPU: the check CI runs.

``python -m peftdecl_cupy.compile_check [--compiler nvcc|nvrtc] [--arch sm_80 sm_90] [names...]``

nvcc (on PATH, or from the ``nvidia-cuda-nvcc`` wheel) builds a fatbin for every architecture at once with
warnings as errors; NVRTC (``libnvrtc`` from the ``nvidia-cuda-nvrtc`` wheel or a CUDA install) compiles each
architecture to CUBIN, the compiler the backend itself uses at run time, and fails on any warning too. Both
compile the text :func:`peftdecl_cupy._modules.module_source` gives. Exit status 1 when any source fails.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftdecl_cupy._modules import COMPILE_OPTIONS, kernel_sources, module_source

ARCHITECTURES = ("sm_80", "sm_90")


@dataclass(frozen=True)
class Outcome:
    """One module compiled by one compiler: ``ok`` and the compiler's messages."""

    name: str
    compiler: str
    ok: bool
    log: str


def find_nvcc() -> str | None:
    """nvcc on PATH, else the one the ``nvidia-cuda-nvcc`` wheel installs into site-packages."""
    found = shutil.which("nvcc")
    if found:
        return found
    return next(iter(_in_wheels("bin/nvcc")), None)


def _in_wheels(relative: str) -> list[str]:
    # NVIDIA's CUDA 13 wheels install under site-packages/nvidia/cu13/
    roots = dict.fromkeys([sysconfig.get_paths()["purelib"], *sys.path])
    return [
        str(Path(r) / "nvidia" / "cu13" / relative)
        for r in roots
        if (Path(r) / "nvidia" / "cu13" / relative).is_file()
    ]


def compile_nvcc(
    name: str, architectures: tuple[str, ...] = ARCHITECTURES, nvcc: str | None = None
) -> Outcome:
    """``nvcc --fatbin`` of module ``name`` for every architecture, all warnings as errors."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return Outcome(name, "nvcc", False, "nvcc not found (PATH or the nvidia-cuda-nvcc wheel)")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{name}.cu"
        source.write_text(module_source(name))
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in architectures]
        command = [nvcc, *COMPILE_OPTIONS, "--fatbin", "-Werror", "all-warnings", *gencode, str(source)]
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, check=False)
    return Outcome(name, "nvcc", done.returncode == 0, (done.stdout + done.stderr).strip())


def find_nvrtc() -> str | None:
    """The path of libnvrtc: the ``nvidia-cuda-nvrtc`` wheel's, else the CUDA toolkit's."""
    candidates = _in_wheels("lib/libnvrtc.so.13")
    home = os.environ.get("CUDA_HOME", os.environ.get("CUDA_PATH", "/usr/local/cuda"))
    candidates += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    return next((c for c in candidates if os.path.isfile(c)), None)


def compile_nvrtc(name: str, architecture: str, library: str | None = None) -> Outcome:
    """NVRTC compile of module ``name`` to CUBIN for ``architecture``; a warning in the log fails it too."""
    library = library or find_nvrtc()
    if library is None:
        return Outcome(name, "nvrtc", False, "libnvrtc not found (the nvidia-cuda-nvrtc wheel or CUDA_HOME)")
    nvrtc = ctypes.CDLL(library)
    program = ctypes.c_void_p()
    text = module_source(name).encode()
    status = nvrtc.nvrtcCreateProgram(ctypes.byref(program), text, f"{name}.cu".encode(), 0, None, None)
    if status != 0:
        return Outcome(name, f"nvrtc {architecture}", False, f"nvrtcCreateProgram failed ({status})")
    options = [*COMPILE_OPTIONS, f"--gpu-architecture={architecture}"]
    array = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    status = nvrtc.nvrtcCompileProgram(program, len(options), array)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    message = log.value.decode(errors="replace").strip()
    ok = status == 0 and "warning" not in message.lower()
    return Outcome(name, f"nvrtc {architecture}", ok, message)


def check(names: list[str], compiler: str, architectures: tuple[str, ...]) -> list[Outcome]:
    """Every module in ``names`` compiled by ``compiler`` (nvcc: one fatbin; nvrtc: one run per architecture)."""
    if compiler == "nvcc":
        return [compile_nvcc(name, architectures) for name in names]
    return [compile_nvrtc(name, arch) for name in names for arch in architectures]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="modules (kernels/<name>.cu); default: every source")
    parser.add_argument("--compiler", choices=("nvcc", "nvrtc"), default="nvcc")
    parser.add_argument("--arch", nargs="+", default=list(ARCHITECTURES))
    args = parser.parse_args(argv)
    names = args.names or [p.stem for p in kernel_sources()]
    failed = 0
    for outcome in check(names, args.compiler, tuple(args.arch)):
        print(f"{'ok  ' if outcome.ok else 'FAIL'} {outcome.name}.cu ({outcome.compiler})", flush=True)
        if outcome.log and not outcome.ok:
            print("    " + outcome.log.replace("\n", "\n    "))
        failed += not outcome.ok
    print(f"{len(names)} sources, {failed} failed ({args.compiler}, {' '.join(args.arch)})")
    return 1 if failed or not names else 0


if __name__ == "__main__":
    sys.exit(main())
