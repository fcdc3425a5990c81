"""Every CUDA source of the CuPy backend compiles for sm_80 and sm_90, without a GPU.

nvcc (PATH or the ``nvidia-cuda-nvcc`` wheel) builds each source for both architectures with all warnings as
errors; NVRTC (the ``nvidia-cuda-nvrtc`` wheel or a CUDA toolkit), the compiler the backend uses at run time,
compiles each to CUBIN per architecture. Each compiler's cases skip with the reason when it is absent. What is
compiled is the text the loader compiles (``module_source``: local includes expanded).
"""

from __future__ import annotations

import ast
import re
import subprocess

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


LAUNCH = re.compile(r'kernel\(\s*"(\w+)",\s*f"(\w+)_\{')
SUFFIXES = ("f32", "f64", "bf16")
EVERY_TYPE = ("lora", "mixed_batch", "dora")  # the modules with float32, float64 and bfloat16 entry points


def launched_entries() -> set[tuple[str, str]]:
    """(module, entry) of every ``kernel("module", f"entry_{suffix}")`` launch in the backend's Python."""
    package = _modules.KERNEL_DIR.parent
    found = set()
    for path in package.glob("*.py"):
        launches = LAUNCH.findall(path.read_text())
        found |= {(m, f"{e}_{s}") for m, e in launches if m in EVERY_TYPE for s in SUFFIXES}
    return found


@pytest.fixture(scope="module")
def ptx_parameters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every ``.entry`` of the PTX nvcc makes for sm_80 from the all-types modules -> its parameter types."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or the nvidia-cuda-nvcc wheel)")
    folder = tmp_path_factory.mktemp("ptx")
    params: dict[str, list[str]] = {}
    for module in EVERY_TYPE:
        source, ptx = folder / f"{module}.cu", folder / f"{module}.ptx"
        source.write_text(_modules.module_source(module))
        command = [nvcc, *_modules.COMPILE_OPTIONS, "--ptx", "-arch=sm_80", str(source), "-o", str(ptx)]
        subprocess.run(command, check=True, capture_output=True)
        for name, body in re.findall(r"\.entry (\w+)\(([^)]*)\)", ptx.read_text()):
            params[name] = re.findall(r"\.param \.(\w+)", body)
    return params


def test_every_launched_entry_point_is_compiled(ptx_parameters: dict[str, list[str]]) -> None:
    """The names the wrappers launch are ``.entry`` points of the modules' PTX (a renamed kernel or a missing
    element type fails here, not on the GPU)."""
    wanted = launched_entries()
    assert {m for m, _ in wanted} == set(EVERY_TYPE)
    missing = {e for _, e in wanted} - set(ptx_parameters)
    assert not missing, f"not compiled: {sorted(missing)}"


def launch_signatures() -> dict[str, list[str]]:
    """entry prefix -> PTX parameter types of each argument the wrappers pass (np.int32: u32, np.float64: f64,
    anything else, arrays and 64-bit integers: u64), read from the wrappers' ``kernel(...)(grid, block, args)``."""
    package = _modules.KERNEL_DIR.parent
    found: dict[str, list[str]] = {}
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            inner = node.func if isinstance(node, ast.Call) else None
            if not (isinstance(inner, ast.Call) and getattr(inner.func, "id", "") == "kernel"):
                continue
            module = ast.literal_eval(inner.args[0])
            if module not in EVERY_TYPE or not isinstance(node.args[2], ast.Tuple):
                continue
            entry = inner.args[1].values[0].value  # f"lora_shrink_{...}": the literal part
            found[f"{entry}"] = [_ptx_type(arg) for arg in node.args[2].elts]
    return found


def _ptx_type(arg: ast.expr) -> str:
    if (
        isinstance(arg, ast.Call)
        and isinstance(arg.func, ast.Attribute)
        and arg.func.attr in ("int32", "float64")
    ):
        return {"int32": "u32", "float64": "f64"}[arg.func.attr]
    return "u64"


def test_every_launch_passes_what_its_kernel_takes(ptx_parameters: dict[str, list[str]]) -> None:
    """Argument count and widths of each launch against the kernel's PTX parameters (CuPy packs arguments
    by their own size: a mismatch would shift every later argument on the device)."""
    signatures = launch_signatures()
    assert len(signatures) == 11
    for prefix, passed in signatures.items():
        for suffix in SUFFIXES:
            assert ptx_parameters[prefix + suffix] == passed, prefix + suffix
