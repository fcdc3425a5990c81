"""The torch backend's whole CUDA-kernel chain on the CPU: hooks, autograd Functions, the DLPack bridge
(:class:`peftdecl_torch.cuda_bridge.CupyKernels`, its outputs and bfloat16 views), the :mod:`peftdecl_cupy` wrappers
and the kernel sources themselves, emulated by g++ (:mod:`tests.cuda_emulator`). Only the DLPack hand-over and
the stream are replaced (``Tensor.numpy``, a view of the same memory), so every model here runs the kernels' arithmetic.

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

from tests import cuda_emulator
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")

if cuda_emulator.available():
    pytest.skip(str(cuda_emulator.available()), allow_module_level=True)
if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

from peftdecl_torch import cuda_kernels  # noqa: E402
from tests.cuda_torch_double import numpy_from_dlpack  # noqa: E402
from tests.test_torch_cuda_dispatch import MODELS, run_model  # noqa: E402

F32_TOL = 1e-5


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> cuda_emulator.Emulator:
    return cuda_emulator.Emulator(Path(tmp_path_factory.mktemp("torch_cuda_emulated")))


@pytest.fixture
def emulated(emulator: cuda_emulator.Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The hooks on CPU tensors, through the real bridge and wrappers into the emulated kernels."""
    from peftdecl_cupy import delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels
    from peftdecl_torch import cuda_bridge

    for module in (delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels):
        monkeypatch.setattr(module, "kernel", emulator.kernel)
        monkeypatch.setattr(module, "_cp", lambda: np)
    monkeypatch.setattr(cuda_bridge, "from_dlpack", numpy_from_dlpack)
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
    case: str, emulated: Any, emulator: cuda_emulator.Emulator, monkeypatch: pytest.MonkeyPatch
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


@pytest.mark.parametrize("double", [False, True])
def test_4bit_dequantisation_and_qlora_through_the_emulated_kernels(
    double: bool, emulated: Any, emulator: cuda_emulator.Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bitsandbytes 4-bit layer's weight (double quantisation decoded by its own kernel) against bitsandbytes'
    dequantisation, then LoRA inference over it on many tokens against the torch path."""
    bnb = pytest.importorskip("bitsandbytes")
    import peftdecl
    from peftdecl_torch.quantized import dequantized_weight

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = bnb.nn.Linear4bit(64, 24, compute_dtype=torch.float32, compress_statistics=double)

        def forward(self, x: Any) -> Any:
            return self.lin(x)

    torch.manual_seed(0)
    net = Net()
    net.lin.load_state_dict(torch.nn.Linear(64, 24).state_dict())
    net = net.to("cpu").eval()
    net.lin.support_avx512bf16_for_cpu = False  # keep bitsandbytes' ordinary layout on AVX512-BF16 CPUs
    got = dequantized_weight(net.lin)
    want = bnb.functional.dequantize_4bit(net.lin.weight.data, net.lin.weight.quant_state)
    assert emulator.launches["nf4_dequant_f32"] >= 1
    assert rel_err(got.numpy(), want.numpy()) <= 1e-6  # the same float32 products (scales summed apart)
    spec = {"peft_type": "LORA", "r": 4, "target_modules": ["lin"], "init_lora_weights": False}
    model = peftdecl.attach(net, spec, "a", "torch", seed=2)
    model.eval()
    x = torch.randn(
        48, 64, generator=torch.Generator().manual_seed(1)
    )  # 48 · (64 + 24) ≥ 64 · 24: merging pays
    with torch.no_grad():
        y = model(x)
        assert emulator.launches["nf4_lowrank_f32"] >= 1
        monkeypatch.setenv(cuda_kernels.ENV, "0")
        cuda_kernels.refresh()
        y_torch = model(x)
    assert rel_err(y.numpy(), y_torch.numpy()) <= F32_TOL
