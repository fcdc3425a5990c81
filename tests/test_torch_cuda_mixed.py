"""Mixed-adapter batches (``adapter_names=``) on the torch backend's CUDA-kernel path, checked on the CPU.

The ``mixed_forward`` hook (:mod:`peftdecl_torch.cuda_mixed`) runs the base layer and one mixed-batch launch per
layer. First with the torch double of the kernels (:class:`tests.cuda_torch_double.TorchKernels`, CPU tensors
counted as the kernels' device): which batches dispatch and which fall back to the torch loop. Then end to end
through the real bridge (:class:`peftdecl_torch.cuda_bridge.CupyKernels`), :class:`peftdecl_cupy.mixed.CupyMixed`
and ``kernels/mixed_batch.cu`` compiled by g++ (:mod:`tests.cuda_emulator`, warps emulated), without CuPy.

Expected values: the same model with the kernels switched off (the torch loop) and each row run alone through
its adapter; float32 within 1e-5 relative (other summation orders through a tiny Llama's two layers), bfloat16
within 2e-2 (the kernels keep X Aᵀ in float32 where torch rounds it to bfloat16, and a rounding of the output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from tests import cuda_emulator
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from peftdecl_torch import cuda_kernels  # noqa: E402
from tests.cuda_torch_double import TorchKernels, numpy_from_dlpack, routed_to_double  # noqa: E402
from tests.hf_models import tiny_llama  # noqa: E402

if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

F32_TOL = 1e-5
BF16_TOL = 2e-2
RANKS = {"r2": 2, "r4": 4, "r8": 8}
TARGETS = ["q_proj", "v_proj"]
ADAPTED_LAYERS = 4  # two decoder layers × q_proj, v_proj
ROWS = ["r4", "__base__", "r8", "r2"]  # three adapters of different ranks and a base row


def lora(r: int, **extra: Any) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": TARGETS,
        "init_lora_weights": False,
        **extra,
    }


def build(dtype: Any = torch.float32, **extra: Any) -> Any:
    """A tiny Llama in ``dtype`` with LoRA adapters r2, r4, r8 (and ``extra``: name -> spec)."""
    base = tiny_llama(seed=0).to(dtype)
    specs = {name: lora(r) for name, r in RANKS.items()} | extra
    model = None
    for seed, (name, spec) in enumerate(specs.items(), start=1):
        if model is None:
            model = peftdecl.attach(base, spec, name, "torch", seed=seed)
        else:
            model.add_adapter(name, spec, seed=seed)
    model.eval()
    return model


def ids(rows: int, tokens: int, seed: int = 0) -> Any:
    return torch.randint(0, 128, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def logits(model: Any, x: Any, names: list[str] | None = None) -> Any:
    with torch.no_grad():
        return model(input_ids=x, adapter_names=names).logits.float()


def switch(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    monkeypatch.setenv(cuda_kernels.ENV, "1" if on else "0")
    cuda_kernels.refresh()


def rows_alone(model: Any, x: Any, names: list[str]) -> Any:
    """Each row run with only its own adapter active (the base model for "__base__")."""
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapters():
                out.append(logits(model, x[i : i + 1]))
        else:
            model.set_adapter(name)
            out.append(logits(model, x[i : i + 1]))
    return torch.cat(out)


# -- the dispatch decisions, with the torch double -------------------------------------------------------------
@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[TorchKernels]:
    """The hooks routed to a fresh :class:`TorchKernels`, CPU tensors counted as the kernels' device."""
    with routed_to_double(monkeypatch) as kernels:
        yield kernels


@pytest.mark.parametrize(("tokens", "names"), [(8, ROWS), (1, ROWS * 2)], ids=["prefill", "decode"])
def test_lora_mixed_batch_takes_the_kernel(
    fake: TorchKernels, monkeypatch: pytest.MonkeyPatch, tokens: int, names: list[str]
) -> None:
    model = build()
    x = ids(len(names), tokens)
    on = logits(model, x, names)
    assert fake.calls["mixed"] == ADAPTED_LAYERS  # one launch per adapted layer
    switch(monkeypatch, False)
    off = logits(model, x, names)
    assert fake.calls["mixed"] == ADAPTED_LAYERS  # not with the switch off
    assert rel_err(on.numpy(), off.numpy()) <= F32_TOL
    assert rel_err(on.numpy(), rows_alone(model, x, names).numpy()) <= F32_TOL


def test_adalora_rows_take_the_kernel(fake: TorchKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    adalora = {
        "peft_type": "ADALORA",
        "init_r": 4,
        "target_r": 2,
        "total_step": 10,
        "target_modules": TARGETS,
        "init_lora_weights": False,
    }
    model = build(ada=adalora)
    names = ["ada", "r2", "__base__", "ada"]
    x = ids(len(names), 6)
    on = logits(model, x, names)
    assert fake.calls["mixed"] == ADAPTED_LAYERS
    switch(monkeypatch, False)
    assert rel_err(on.numpy(), logits(model, x, names).numpy()) <= F32_TOL


def test_half_base_with_float32_adapters(fake: TorchKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 base with float32 adapters (PEFT's autocast rule): the update in float32 on float32 casts of
    the input and the base output, as the torch loop computes it, cast back to bfloat16."""
    model = build(torch.bfloat16)
    x = ids(len(ROWS), 5)
    on = logits(model, x, ROWS)
    assert fake.calls["mixed"] == ADAPTED_LAYERS
    switch(monkeypatch, False)
    assert rel_err(on.numpy(), logits(model, x, ROWS).numpy()) <= BF16_TOL


@pytest.mark.parametrize(
    "extra",
    [
        {"loha": {"peft_type": "LOHA", "r": 2, "target_modules": TARGETS, "init_weights": False}},
        {"bias": lora(2, lora_bias=True)},
    ],
    ids=["loha-rows", "lora-bias"],
)
def test_uncovered_adapters_fall_back(
    fake: TorchKernels, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]
) -> None:
    model = build(**extra)
    names = ["r2", next(iter(extra)), "__base__"]
    x = ids(len(names), 4)
    on = logits(model, x, names)
    assert fake.calls["mixed"] == 0
    switch(monkeypatch, False)
    assert torch.equal(on, logits(model, x, names))  # the same torch loop


def test_embedding_layer_falls_back_alone(fake: TorchKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter that also targets the embedding: that layer runs the torch loop, the linear ones the kernel."""
    model = build(emb={**lora(2), "target_modules": ["embed_tokens", *TARGETS]})
    names = ["emb", "r4", "__base__"]
    x = ids(len(names), 4)
    on = logits(model, x, names)
    assert fake.calls["mixed"] == ADAPTED_LAYERS
    switch(monkeypatch, False)
    assert rel_err(on.numpy(), logits(model, x, names).numpy()) <= F32_TOL


def test_gradients_and_training_dropout_fall_back(fake: TorchKernels) -> None:
    model = build(drop=lora(2, lora_dropout=0.5))
    names = ["r2", "r8"]
    x = ids(len(names), 4)
    embeds = model.model.get_input_embeddings()(x).detach().requires_grad_(True)
    model(inputs_embeds=embeds, adapter_names=names).logits.sum().backward()  # a graph to differentiate
    assert fake.calls["mixed"] == 0 and embeds.grad is not None
    model.train()
    logits(model, x, ["drop", "r2"])  # dropout draws in training mode
    assert fake.calls["mixed"] == 0
    logits(model, x, names)  # training mode without dropout, under no_grad: the kernel
    assert fake.calls["mixed"] == ADAPTED_LAYERS


def test_rank_past_the_gathered_limit_falls_back(fake: TorchKernels) -> None:
    fake.max_gather_rank = 4
    model = build()
    logits(model, ids(4, 1), ["r8", "r2", "r4", "r2"])  # decode: the gathered kernels, rank 8 > 4
    assert fake.calls["mixed"] == 0
    logits(model, ids(4, 1), ["r4", "r2", "__base__", "r2"])  # ranks within the limit
    assert fake.calls["mixed"] == ADAPTED_LAYERS
    logits(model, ids(2, 64), ["r8", "r2"])  # prefill: segmented kernels, any rank
    assert fake.calls["mixed"] == 2 * ADAPTED_LAYERS


def test_cpu_tensors_and_switch_off_are_never_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build()
    kernels = TorchKernels()
    switch(monkeypatch, True)
    with cuda_kernels.use_kernels(kernels):
        assert cuda_kernels.DEVICE_TYPE == "cuda"
        logits(model, ids(4, 3), ROWS)
        monkeypatch.setattr(cuda_kernels, "DEVICE_TYPE", "cpu")
        switch(monkeypatch, False)
        logits(model, ids(4, 3), ROWS)
    cuda_kernels.refresh()
    assert not kernels.calls


# -- end to end: the bridge, CupyMixed and mixed_batch.cu under the emulator, without CuPy ----------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if cuda_emulator.available():
        pytest.skip(str(cuda_emulator.available()))
    return cuda_emulator.build("mixed_batch", Path(tmp_path_factory.mktemp("torch_mixed")))


@pytest.fixture
def emulated(library: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """The hook through the real bridge into the emulated kernels; yields the launches per entry point."""
    from peftdecl_cupy import mixed
    from peftdecl_torch import cuda_bridge

    launches: dict[str, int] = {}

    def kernel(module: str, entry: str) -> Any:
        assert module == "mixed_batch"
        run = cuda_emulator.EmulatedKernel(library, entry)

        def launch(grid: Any, block: Any, args: Any) -> None:
            launches[entry] = launches.get(entry, 0) + 1
            run(grid, block, args)

        return launch

    shim = cuda_emulator.numpy_as_cupy()

    def poisoned(*args: Any, **kwargs: Any) -> Any:  # the launch's own buffers (U) start as NaN
        return np.full(*args, fill_value=np.nan, **kwargs)

    shim.empty = poisoned  # type: ignore[attr-defined]
    monkeypatch.setattr(mixed, "_cp", lambda: shim)
    monkeypatch.setattr(mixed, "kernel", kernel)
    monkeypatch.setattr(cuda_bridge, "from_dlpack", numpy_from_dlpack)
    monkeypatch.setattr(cuda_bridge, "on_stream", lambda t: contextlib.nullcontext())
    monkeypatch.setattr(cuda_kernels, "DEVICE_TYPE", "cpu")
    switch(monkeypatch, True)
    with cuda_kernels.use_kernels(cuda_bridge.CupyKernels()):
        yield launches
    cuda_kernels.refresh()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("rows", "tokens", "path"),
    [(["r4", "r4", "__base__", "r8", "r2", "r2"], 32, "sgmv"), (ROWS * 2, 1, "bgmv")],
    ids=["prefill", "decode"],
)
def test_llama_mixed_batch_through_the_emulated_kernels(
    emulated: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    dtype: Any,
    rows: list[str],
    tokens: int,
    path: str,
) -> None:
    model = build()
    model.engine.to(dtype)  # the adapters in bfloat16 too: the kernels' bfloat16 entry points
    x = ids(len(rows), tokens)
    on = logits(model, x, rows)
    suffix = "bf16" if dtype == torch.bfloat16 else "f32"
    assert emulated == {f"{path}_shrink_{suffix}": ADAPTED_LAYERS, f"{path}_expand_{suffix}": ADAPTED_LAYERS}
    switch(monkeypatch, False)
    off = logits(model, x, rows)
    assert sum(emulated.values()) == 2 * ADAPTED_LAYERS  # no launch with the switch off
    assert torch.isfinite(on).all()
    tol = F32_TOL if dtype == torch.float32 else BF16_TOL
    assert rel_err(on.numpy(), off.numpy()) <= tol


def test_generation_with_adapter_names_takes_the_kernel(
    fake: TorchKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy generation, each row with its adapter: the prompt and every decode step (one token a row) through
    the kernel, the same tokens as the torch loop."""
    model = build()
    x = ids(len(ROWS), 5)
    with torch.no_grad():
        on = model.generate(input_ids=x, adapter_names=ROWS, max_new_tokens=4, do_sample=False)
    assert fake.calls["mixed"] == 4 * ADAPTED_LAYERS  # the prompt, then three decode steps
    switch(monkeypatch, False)
    with torch.no_grad():
        off = model.generate(input_ids=x, adapter_names=ROWS, max_new_tokens=4, do_sample=False)
    assert torch.equal(on, off)


def test_gpt2_conv1d_layers_take_the_kernel(fake: TorchKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2's Conv1D stores its weight [in, out]; LoRA's A [r, in] and B [out, r] are the same as on a Linear."""
    from tests.hf_models import tiny_gpt2

    model = None
    for seed, r in enumerate((2, 4), start=1):
        spec = {**lora(r), "target_modules": ["c_attn"], "fan_in_fan_out": True}
        if model is None:
            model = peftdecl.attach(tiny_gpt2(), spec, f"r{r}", "torch", seed=seed)
        else:
            model.add_adapter(f"r{r}", spec, seed=seed)
    model.eval()
    names = ["r4", "__base__", "r2"]
    x = ids(len(names), 6) % 100  # GPT-2's vocabulary here
    on = logits(model, x, names)
    assert fake.calls["mixed"] == 2  # c_attn of both blocks
    switch(monkeypatch, False)
    assert rel_err(on.numpy(), logits(model, x, names).numpy()) <= F32_TOL
    assert rel_err(on.numpy(), rows_alone(model, x, names).numpy()) <= F32_TOL
