"""LoRA, AdaLoRA and DoRA's weight norm through the torch backend's whole CUDA-kernel chain on the CPU: the hooks,
:class:`peftdecl_torch.cuda_lowrank.LowRankLinear`, the DLPack bridge (:class:`peftdecl_torch.cuda_bridge.
CupyKernels`, its torch-allocated outputs and bfloat16 views), the :class:`peftdecl_cupy.lowrank.CupyLowRank` and
:class:`peftdecl_cupy.dora.CupyDora` launches and the ``lora.cu``/``dora.cu`` sources themselves, compiled by g++
(:mod:`tests.cuda_emulator`). Replaced: the DLPack hand-over and the stream (``Tensor.numpy``, a view of the same
memory) and CuPy's array module (NumPy), so this runs without CuPy.

Expected values: the same model with the kernels switched off (the torch path): float32 within 1e-5 relative
(:func:`tests.conftest.rel_err`; another summation order), bfloat16 activations within 2e-2 (the kernels keep
U = x Aᵀ in float32 where the torch path rounds it to bfloat16), gradients likewise.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import cuda_emulator
from tests.conftest import selected_backends

torch = pytest.importorskip("torch")

if cuda_emulator.available():
    pytest.skip(str(cuda_emulator.available()), allow_module_level=True)
if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

from peftdecl_torch import cuda_kernels  # noqa: E402
from tests.cuda_torch_double import numpy_from_dlpack  # noqa: E402
from tests.test_torch_cuda_lowrank_dispatch import ADALORA, LORA, assert_same, run_model  # noqa: E402

F32_TOL, BF16_TOL = 1e-5, 2e-2


class Launches:
    """The emulated kernels by (module, entry point), each launch counted."""

    def __init__(self, folder: Path) -> None:
        self.libraries = {module: cuda_emulator.build(module, folder) for module in ("lora", "dora")}
        self.counts: collections.Counter[str] = collections.Counter()

    def kernel(self, module: str, entry: str) -> Any:
        launch = cuda_emulator.EmulatedKernel(self.libraries[module], entry)

        def counted(*args: Any) -> None:
            self.counts[entry] += 1
            launch(*args)

        return counted


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> Launches:
    return Launches(tmp_path_factory.mktemp("torch_lowrank_emulated"))


@pytest.fixture
def emulated(launches: Launches, monkeypatch: pytest.MonkeyPatch) -> Iterator[Launches]:
    """The hooks on CPU tensors, through the real bridge and wrappers into the emulated kernels."""
    from peftdecl_cupy import dora, lowrank
    from peftdecl_torch import cuda_bridge

    shim = cuda_emulator.numpy_as_cupy()
    for module in (lowrank, dora):
        monkeypatch.setattr(module, "kernel", launches.kernel)
        monkeypatch.setattr(module, "_cp", lambda: shim)
    monkeypatch.setattr(lowrank, "multiprocessors", lambda: 4)  # so the gradient sums split over tokens
    monkeypatch.setattr(cuda_bridge, "from_dlpack", numpy_from_dlpack)
    monkeypatch.setattr(cuda_bridge, "on_stream", lambda t: contextlib.nullcontext())
    monkeypatch.setenv(cuda_kernels.ENV, "1")
    monkeypatch.setattr(cuda_kernels, "DEVICE_TYPE", "cpu")
    cuda_kernels.refresh()
    launches.counts.clear()
    with cuda_kernels.use_kernels(cuda_bridge.CupyKernels()):
        yield launches
    cuda_kernels.refresh()


MODELS = {
    "lora": (LORA, {"lora_shrink_f32", "lora_expand_f32", "lora_outer_f32", "lora_finish_f32"}),
    "lora_bias_rslora": ({**LORA, "lora_bias": True, "use_rslora": True}, {"lora_shrink_f32"}),
    "adalora": ({**ADALORA, "init_lora_weights": False}, {"lora_shrink_f32", "lora_outer_f32"}),
    "dora": (
        {**LORA, "use_dora": True, "use_rslora": True},
        {"dora_row_sumsq_f32", "dora_norm_f32", "dora_output_f32", "lora_expand_f32", "lora_outer_f32"},
    ),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_models_through_the_emulated_kernels(
    case: str, emulated: Launches, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, entries = MODELS[case]
    on = run_model(spec, 40, options={"fused_merged": False})  # 40 tokens: past one 32-token tile
    assert entries <= set(emulated.counts), dict(emulated.counts)  # the kernels ran
    launched = sum(emulated.counts.values())
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    cuda_kernels.refresh()
    off = run_model(spec, 40, options={"fused_merged": False})
    assert sum(emulated.counts.values()) == launched  # and not with the switch off
    assert on[1], "no gradients"
    assert_same(on, off, F32_TOL)


def test_bfloat16_activations_through_the_bridge(emulated: Launches, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 base with float32 adapters: uint16 views of the bfloat16 x, A, B, y and dx; U, du and the
    gradient workspaces in float32; dA and dB written in bfloat16 through the transposed dBᵀ view."""
    on = run_model(LORA, 5, torch.bfloat16)
    assert {"lora_shrink_bf16", "lora_expand_bf16", "lora_finish_bf16"} <= set(emulated.counts)
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    cuda_kernels.refresh()
    assert_same(on, run_model(LORA, 5, torch.bfloat16), BF16_TOL)
