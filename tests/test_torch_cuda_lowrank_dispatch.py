"""The torch backend's dispatch of LoRA, AdaLoRA and DoRA's weight norm to the low-rank kernels, on the CPU.

The hooks are routed to the torch double of the kernels (:class:`tests.cuda_torch_double.TorchKernels`, what
``kernels/lora.cu`` and ``kernels/dora.cu`` state, in torch ops) with CPU tensors counted as the kernels'
device. Checked: the autograd Function's wiring by ``torch.autograd.gradcheck`` (float64 finite differences),
whole adapted models with the kernels on against the same models with them off (the torch path), and every
case the kernels do not cover taking the torch path without a kernel call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import peftdecl
from tests.conftest import rel_err, selected_backends

torch = pytest.importorskip("torch")

from peftdecl_torch import cuda_kernels  # noqa: E402
from peftdecl_torch.cuda_lowrank import DoraLowRank, LowRankLinear  # noqa: E402
from tests.cuda_torch_double import TorchKernels, routed_to_double  # noqa: E402

if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

F32_TOL = 1e-5  # float32 both ways; the kernel path sums the rank products in another order
LOWRANK = {"shrink", "expand", "outer"}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[TorchKernels]:
    """The hooks routed to a fresh :class:`TorchKernels`, CPU tensors counted as the kernels' device."""
    with routed_to_double(monkeypatch) as kernels:
        yield kernels


def switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    cuda_kernels.refresh()


def rand(*shape: int, seed: int = 0, grad: bool = True) -> Any:
    t = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(grad)


# -- the Function: gradcheck in float64 ------------------------------------------------------------------------
@pytest.mark.parametrize("scaled", [False, True], ids=["lora", "adalora"])
@pytest.mark.parametrize("save_shrink", [True, False])
@pytest.mark.parametrize("stored_in_out", [False, True])
def test_lowrank_function_gradients(
    fake: TorchKernels, scaled: bool, save_shrink: bool, stored_in_out: bool
) -> None:
    d_in, d_out = 5, 6
    # [out, in], or GPT-2's [in, out] when stored_in_out
    weight = rand(*((d_in, d_out) if stored_in_out else (d_out, d_in)), seed=1, grad=False)
    bias = rand(d_out, seed=2, grad=False)
    x, a, b = rand(2, 3, d_in), rand(4, d_in, seed=3), rand(d_out, 4, seed=4)
    b_bias = None if scaled else rand(d_out, seed=5)
    e = rand(4, seed=6) if scaled else None

    def run(x: Any, a: Any, b: Any, *rest: Any) -> Any:
        bb, ee = (None, rest[0]) if scaled else (rest[0], None)
        return LowRankLinear.apply(x, weight, bias, a, b, bb, ee, 0.7, stored_in_out, save_shrink, fake)

    inputs = (x, a, b, e if scaled else b_bias)
    assert torch.autograd.gradcheck(run, inputs)
    w = weight.t() if stored_in_out else weight
    scale = 1.0 if e is None else e
    want = x @ w.t() + bias + 0.7 * ((x @ a.t()) * scale) @ b.t() + (0 if b_bias is None else 0.7 * b_bias)
    assert torch.allclose(run(*inputs), want, rtol=0, atol=1e-12)  # float64, another summation order
    assert set(fake.calls) >= LOWRANK


@pytest.mark.parametrize("with_bias", [False, True])
def test_dora_function_gradients(fake: TorchKernels, with_bias: bool) -> None:
    weight, bias = rand(6, 5, seed=1, grad=False), rand(6, seed=2, grad=False) if with_bias else None
    x, a, b, m = rand(2, 3, 5), rand(4, 5, seed=3), rand(6, 4, seed=4), rand(6, seed=5)
    n = (
        rand(6, seed=6, grad=False).abs() + 0.5
    )  # the norm is an input without gradient (detached, as in DoRA)

    def run(x: Any, a: Any, b: Any, m: Any) -> Any:
        return DoraLowRank.apply(x, weight, bias, a, b, m, n, 0.7, fake)

    assert torch.autograd.gradcheck(run, (x, a, b, m))
    base = 0 if bias is None else bias
    want = base + (m / n) * (x @ weight.t() + 0.7 * (x @ a.t()) @ b.t())
    assert torch.allclose(run(x, a, b, m), want, rtol=0, atol=1e-12)  # float64, another summation order
    assert set(fake.calls) >= {"shrink", "dora_output", "outer", "expand"}


# -- whole models: the kernels on against the torch path -----------------------------------------------------------
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": False}
ADALORA = {"peft_type": "ADALORA", "init_r": 6, "target_r": 4, "lora_alpha": 12, "total_step": 10}
MODELS = {
    "lora": (LORA, LOWRANK),
    "lora_bias": ({**LORA, "lora_bias": True}, LOWRANK),
    "rslora": ({**LORA, "use_rslora": True}, LOWRANK),
    "lora_dropout_eval": ({**LORA, "lora_dropout": 0.5}, LOWRANK),  # eval mode: no dropout, so the kernels
    "adalora": ({**ADALORA, "init_lora_weights": False}, LOWRANK),
    "dora": ({**LORA, "use_dora": True}, {"dora_norm", "dora_output", *LOWRANK}),
    "dora_rslora": ({**LORA, "use_dora": True, "use_rslora": True}, {"dora_norm", "dora_output"}),
}


def run_model(
    spec: dict[str, Any],
    tokens: int,
    dtype: Any = torch.float32,
    train: bool = True,
    grad: bool = True,
    options: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Output and gradients of the 12 → 16 → 10 MLP adapted by ``spec`` on ``tokens`` inputs."""
    from tests.torch_mlp import torch_mlp

    base = torch_mlp(0).to(dtype)
    spec = {**spec, "target_modules": ["lin0", "lin1"]}
    model = peftdecl.attach(base, spec, "a", "torch", seed=3, engine_options=options)
    model.train(train)
    x = torch.linspace(-1.0, 1.0, tokens * 12, dtype=dtype).reshape(tokens, 12)
    with torch.set_grad_enabled(grad):
        y = model(x)
    if not grad:
        return y, {}
    (y.float() * torch.linspace(0.5, 1.5, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.base_model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def assert_same(got: tuple[Any, dict[str, Any]], want: tuple[Any, dict[str, Any]], tol: float) -> None:
    assert rel_err(got[0].double().numpy(), want[0].double().numpy()) <= tol
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        assert rel_err(got[1][name].double().numpy(), grad.double().numpy()) <= tol, name


@pytest.mark.parametrize("case", sorted(MODELS))
def test_models_with_kernels_equal_the_torch_path(
    case: str, fake: TorchKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, expected = MODELS[case]
    train = case != "lora_dropout_eval"
    on = run_model(spec, 4, train=train)  # 4 tokens: merging W + s·B A would not pay
    assert expected <= set(fake.calls), dict(fake.calls)
    assert on[1], "no gradients"
    calls = sum(fake.calls.values())
    switch_off(monkeypatch)
    off = run_model(spec, 4, train=train)
    assert sum(fake.calls.values()) == calls  # switched off: the kernels are not called
    assert_same(on, off, F32_TOL)


def test_bfloat16_base_with_float32_adapters(fake: TorchKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 base: A and B cast to bfloat16 per call as the torch path's half compute does, U kept in
    float32 by the kernels (the torch path rounds it to bfloat16): within bfloat16's 2e-2."""
    fake.dtypes = frozenset({torch.float32, torch.bfloat16})
    on = run_model(LORA, 4, torch.bfloat16)
    assert set(fake.calls) >= LOWRANK
    switch_off(monkeypatch)
    assert_same(on, run_model(LORA, 4, torch.bfloat16), 2e-2)


def test_dora_on_a_bfloat16_base_takes_the_torch_path(fake: TorchKernels) -> None:
    """float32 magnitudes over a bfloat16 base: the output kernel would read m in bfloat16 (the torch path keeps
    g = m / n in float32), and the norm kernel takes one dtype: neither runs."""
    fake.dtypes = frozenset({torch.float32, torch.bfloat16})
    run_model({**LORA, "use_dora": True}, 4, torch.bfloat16)
    assert not fake.calls, dict(fake.calls)


# -- what the kernels do not cover takes the torch path --------------------------------------------------------
FALLBACKS = {
    "dropout_in_training": ({**LORA, "lora_dropout": 0.5}, {}),
    "fused_off": (LORA, {"options": {"fused": False}}),
    "merge_pays_at_inference": (LORA, {"tokens": 64, "grad": False, "train": False}),
    "merge_pays_in_training": (LORA, {"tokens": 64}),
    "float16": (LORA, {"dtype": torch.float16, "grad": False}),
    "adalora_dropout": ({**ADALORA, "init_lora_weights": False, "lora_dropout": 0.5}, {}),
    "dora_merge_pays": ({**LORA, "use_dora": True}, {"tokens": 64}),
    "dora_dropout": ({**LORA, "use_dora": True, "lora_dropout": 0.5}, {}),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_uncovered_cases_take_the_torch_path(case: str, fake: TorchKernels) -> None:
    spec, kwargs = FALLBACKS[case]
    y, _ = run_model(spec, kwargs.pop("tokens", 4), **kwargs)
    assert torch.isfinite(y).all()
    assert not (LOWRANK | {"dora_output"}) & set(fake.calls), dict(fake.calls)


def test_cpu_tensors_are_never_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cuda_kernels.ENV, "1")
    cuda_kernels.refresh()
    kernels = TorchKernels()
    with cuda_kernels.use_kernels(kernels):
        assert cuda_kernels.DEVICE_TYPE == "cuda"
        run_model(LORA, 4)
        run_model({**LORA, "use_dora": True}, 4)
    cuda_kernels.refresh()
    assert not kernels.calls


def test_merged_embedding_and_conv_layers_take_the_torch_path(fake: TorchKernels) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 12)
            self.conv = torch.nn.Conv1d(12, 8, 3)
            self.lin = torch.nn.Linear(8, 6)

        def forward(self, ids: Any) -> Any:
            return self.lin(self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2))

    torch.manual_seed(0)
    model = peftdecl.attach(Net(), {**LORA, "target_modules": ["emb", "conv", "lin"]}, "a", "torch")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(ids)
    assert fake.calls["shrink"] == 1  # the linear layer only
    model.merge()
    merged = model(ids)
    assert fake.calls["shrink"] == 1  # merged: the base layers run, no adapter
    model.unmerge()
    assert rel_err(model(ids).detach().numpy(), merged.detach().numpy()) <= F32_TOL


def test_gpt2_conv1d_layers(fake: TorchKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2's Conv1D stores its weight as [in, out]: the kernel path reads it through the transposed view."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn, self.c_proj = Conv1D(16, 12), Conv1D(10, 16)

        def forward(self, x: Any) -> Any:
            return self.c_proj(torch.relu(self.c_attn(x)))

    def run() -> tuple[Any, dict[str, Any]]:
        torch.manual_seed(0)
        model = peftdecl.attach(Net(), {**LORA, "target_modules": ["c_attn", "c_proj"]}, "a", "torch", seed=3)
        x = torch.linspace(-1.0, 1.0, 48).reshape(4, 12)
        y = model(x)
        (y * torch.linspace(0.5, 1.5, y.numel()).reshape(y.shape)).sum().backward()
        return y.detach(), {n: p.grad for n, p in model.base_model.named_parameters() if p.grad is not None}

    on = run()
    assert fake.calls["shrink"] >= 2
    switch_off(monkeypatch)
    assert_same(on, run(), F32_TOL)
