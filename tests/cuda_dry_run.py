"""A pytest plugin that runs the GPU kernel tests on the CPU, to check the test code itself without a device:

    python -m pytest -p tests.cuda_dry_run tests/test_cuda_kernels_lora.py      (under a minute on 2 cores)
    python -m pytest -p tests.cuda_dry_run tests/test_cuda_kernels_other.py -k "not on_cuda and not hooked"
                                                                                  (about 4-5 minutes on 2 cores)

It stands NumPy in for CuPy (tests/cuda_emulator.py's stand-in plus ``asnumpy`` and a ``cuda`` namespace),
declares a device present, and launches every module's kernels (LoRA/mixed-batch/DoRA, OFT/BOFT, IA3, VeRA,
LoHa/LoKr, 4-bit) through the CPU emulator, each module compiled on first use. The ``-k`` leaves out
test_cuda_kernels_other.py's torch tests, which put torch tensors on a CUDA device. A pass says the tests and
the wrappers agree with the sources' arithmetic; it is not a GPU run (no NVRTC, no device memory, no timing) and
is never part of the suite: only ``-p tests.cuda_dry_run`` loads it.
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
from peftdecl_cupy import (  # noqa: E402
    delta_kernels,
    dora,
    lowrank,
    mixed,
    nf4_kernels,
    rotation_kernels,
    scaling_kernels,
)

_device.unavailable_reason = lambda: ""
_emulator = cuda_emulator.Emulator(Path(tempfile.mkdtemp()))
for _wrappers in (lowrank, mixed, dora, delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels):
    _wrappers.kernel = _emulator.kernel  # type: ignore[attr-defined]
lowrank.multiprocessors = lambda: 4  # type: ignore[assignment]
