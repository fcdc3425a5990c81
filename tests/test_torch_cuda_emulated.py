"""The torch backend's whole CUDA-kernel chain on the CPU: hooks, autograd Functions, the DLPack bridge
(:class:`peftdecl_torch.cuda_bridge.CupyKernels`, its outputs and bfloat16 views), the :mod:`peftdecl_cupy` wrappers
and the kernel sources themselves, emulated by g++ (:mod:`tests.kernel_emulator`). Only the DLPack hand-over and
the stream are replaced (by NumPy views of the same memory), so every model here runs the kernels' arithmetic.

Expected values: the same model with the kernels switched off (the torch path), float32 within 1e-5 relative
(:func:`tests.conftest.rel_err`; different summation orders), and its gradients likewise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import kernel_emulator
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")

if kernel_emulator.compiler() is None:
    pytest.skip("needs g++ to build the kernel sources for the CPU", allow_module_level=True)
if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

from peftdecl_torch import cuda_kernels  # noqa: E402
from tests.test_torch_cuda_dispatch import MODELS, run_model  # noqa: E402

F32_TOL = 1e-5


def numpy_view(t: Any) -> Any:
    """What ``cupy.from_dlpack`` gives on a device: the tensor's memory, bfloat16 as uint16 bits."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> kernel_emulator.Emulator:
    return kernel_emulator.Emulator(Path(tmp_path_factory.mktemp("torch_cuda_emulated")))


@pytest.fixture
def emulated(emulator: kernel_emulator.Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The hooks on CPU tensors, through the real bridge and wrappers into the emulated kernels."""
    from peftdecl_cupy import delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels
    from peftdecl_torch import cuda_bridge

    for module in (delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels):
        monkeypatch.setattr(module, "kernel", emulator.kernel)
        monkeypatch.setattr(module, "_cp", lambda: np)
    monkeypatch.setattr(cuda_bridge, "view", numpy_view)
    monkeypatch.setattr(cuda_bridge, "on_stream", lambda t: contextlib.nullcontext())
    monkeypatch.setenv(cuda_kernels.ENV, "1")
    monkeypatch.setattr(cuda_kernels, "DEVICE_TYPE", "cpu")
    cuda_kernels.refresh()
    kernels = cuda_bridge.CupyKernels()
    with cuda_kernels.use_kernels(kernels):
        yield kernels
    cuda_kernels.refresh()


@pytest.mark.parametrize("case", sorted(MODELS))
def test_models_through_the_emulated_kernels(
    case: str, emulated: Any, emulator: kernel_emulator.Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _ = MODELS[case]
    tokens = 16 if case.endswith("merged") else 4
    before = sum(emulator.launches.values())
    y_kernels, g_kernels = run_model(spec, tokens, torch.float32)
    launched = sum(emulator.launches.values())
    assert launched > before  # the kernels ran
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    cuda_kernels.refresh()
    y_torch, g_torch = run_model(spec, tokens, torch.float32)
    assert sum(emulator.launches.values()) == launched  # and not with the switch off
    assert rel_err(y_kernels.numpy(), y_torch.numpy()) <= F32_TOL
    assert g_kernels.keys() == g_torch.keys() and g_torch
    for name, grad in g_torch.items():
        assert rel_err(g_kernels[name].numpy(), grad.numpy()) <= F32_TOL, name


def test_bfloat16_activations_through_the_bridge(emulated: Any) -> None:
    """OFT's rotation of a bfloat16 input: the bridge's uint16 views of bfloat16 tensors, in and out."""
    from peftdecl_torch.kinds._rotation import rotate_blocks

    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(5, 12, generator=g), torch.randn(3, 4, 4, generator=g)
    got = rotate_blocks(x.bfloat16(), r)
    assert got.dtype == torch.bfloat16
    want = torch.einsum("tnk,nkc->tnc", x.bfloat16().double().view(5, 3, 4), r.double()).reshape(5, 12)
    assert rel_err(got.double().numpy(), want.numpy()) <= 2e-2  # one bfloat16 rounding of the output
