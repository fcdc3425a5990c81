"""Every CUDA source of the CuPy backend compiles for sm_80 and sm_90, without a GPU.

nvcc (PATH or the ``nvidia-cuda-nvcc`` wheel) builds each source for both architectures with all warnings as
errors; NVRTC (the ``nvidia-cuda-nvrtc`` wheel or a CUDA toolkit), the compiler the backend uses at run time,
compiles each to CUBIN per architecture. Each compiler's cases skip with the reason when it is absent. What is
compiled is the text the loader compiles (``module_source``: local includes expanded).
"""

from __future__ import annotations

import pytest

from peftdecl_cupy import _modules
from peftdecl_cupy.compile_check import ARCHITECTURES, compile_nvcc, compile_nvrtc, find_nvcc, find_nvrtc

SOURCES = [p.stem for p in _modules.kernel_sources()]


def test_the_sources_include_the_backends_own_modules() -> None:
    assert {"lora", "mixed_batch", "dora"} <= set(SOURCES)


def test_module_source_expands_local_includes_once() -> None:
    text = _modules.module_source("lora")
    assert '#include "' not in text
    assert text.count("struct bf16_t {") == 1  # common.cuh reached twice (directly and via lowrank_tiles.cuh)
    assert "lora_shrink_##SUFFIX" in text


def test_unknown_module_names_the_known_ones() -> None:
    with pytest.raises(FileNotFoundError, match="lora"):
        _modules.module_source("no_such_kernel")


@pytest.mark.parametrize("name", SOURCES)
def test_nvcc_compiles_for_sm80_and_sm90(name: str) -> None:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or the nvidia-cuda-nvcc wheel)")
    outcome = compile_nvcc(name, ARCHITECTURES, nvcc)
    assert outcome.ok, outcome.log


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("name", SOURCES)
def test_nvrtc_compiles_without_warnings(name: str, architecture: str) -> None:
    library = find_nvrtc()
    if library is None:
        pytest.skip("libnvrtc not found (the nvidia-cuda-nvrtc wheel or CUDA_HOME)")
    outcome = compile_nvrtc(name, architecture, library)
    assert outcome.ok, outcome.log


def test_a_broken_source_fails_the_check(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a source with a type error and one with an unused variable (a warning) both fail."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or the nvidia-cuda-nvcc wheel)")
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* p) { p[0] = undeclared; }\n')
    (tmp_path / "warns.cu").write_text(
        'extern "C" __global__ void k(float* p) { int unused = 1; p[0] = 1; }\n'
    )
    monkeypatch.setattr(_modules, "KERNEL_DIR", tmp_path)
    assert not compile_nvcc("broken", ("sm_80",), nvcc).ok
    assert not compile_nvcc("warns", ("sm_80",), nvcc).ok
