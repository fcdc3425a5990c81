"""A pytest plugin that runs the GPU kernel tests on the CPU, to check the test code itself without a device:

    python -m pytest -p tests.cuda_dry_run tests/test_cuda_kernels_lora.py      (about 2-3 minutes on 2 cores)

It stands NumPy in for CuPy (tests/cuda_emulator.py's stand-in plus ``asnumpy`` and a ``cuda`` namespace),
declares a device present, and launches the LoRA/mixed-batch/DoRA kernels through the CPU emulator. A pass
says the tests and the wrappers agree with the sources' arithmetic; it is not a GPU run (no NVRTC, no device
memory, no timing) and is never part of the suite: only ``-p tests.cuda_dry_run`` loads it.
"""

from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from tests import cuda_emulator

_shim = cuda_emulator.numpy_as_cupy()
_shim.asnumpy = lambda a: np.array(a)  # type: ignore[attr-defined]
_shim.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
    Device=lambda: types.SimpleNamespace(attributes={"MultiProcessorCount": 4}),
    runtime=types.SimpleNamespace(getDevice=lambda: 0),
)
sys.modules["cupy"] = _shim

import peftdecl_cupy._device as _device  # noqa: E402
from peftdecl_cupy import dora, lowrank, mixed  # noqa: E402

_device.unavailable_reason = lambda: ""
_libraries = {m: cuda_emulator.build(m, Path(tempfile.mkdtemp())) for m in ("lora", "mixed_batch", "dora")}
for _wrappers in (lowrank, mixed, dora):
    _wrappers.kernel = lambda module, entry: cuda_emulator.EmulatedKernel(_libraries[module], entry)  # type: ignore[assignment]
lowrank.multiprocessors = lambda: 4  # type: ignore[assignment]
