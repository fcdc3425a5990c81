"""peftdecl_torch.gemm: the choice of GEMM library for CPU float32 products, and both libraries' results.

Products against float64 NumPy (relative ≤ 1e-6: float32 rounding over inner sizes up to 48); the differentiable
linear's first and second derivatives against float64 (≤ 1e-6); every kind and layer type against the NumPy
reference with each library forced (float32 ≤ 1e-5, as test_torch_kinds).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import rel_err

torch = pytest.importorskip("torch")

from peftdecl_torch import gemm  # noqa: E402
from tests.test_torch_kinds import PAIRS, available, check_against_reference  # noqa: E402

ENGINES = [
    "blas",
    pytest.param(
        "onednn",
        marks=pytest.mark.skipif(
            not gemm.onednn_available(), reason="this torch build has no oneDNN linear operator"
        ),
    ),
]


@pytest.fixture
def engine(request, monkeypatch) -> str:
    monkeypatch.setattr(gemm, "ENGINE", request.param)
    monkeypatch.setattr(gemm, "MIN_WORK", 0)
    return request.param


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_products_match_float64_for_any_strides(engine: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=gen)
    w = torch.randn(40, 96, generator=gen)[:, ::2]  # every other column: [40, 48], strided
    w_t = torch.randn(48, 40, generator=gen).t()  # a transposed view, [40, 48]
    bias = torch.randn(40, generator=gen)
    wide = torch.randn(10, 60, generator=gen)[:, 6:54]  # [10, 48], rows with a stride of 60
    assert gemm.routes_to_onednn(10, 48, 40, wide, w_t) == (engine == "onednn")
    cases = [
        (gemm.linear(x, w), _f64(x) @ _f64(w).T),
        (gemm.linear(x, w_t, bias), _f64(x) @ _f64(w_t).T + _f64(bias)),
        (gemm.linear(wide, w_t), _f64(wide) @ _f64(w_t).T),
        (gemm.mm(wide, w_t.t()), _f64(wide) @ _f64(w_t).T),
        (gemm.mm(wide, w.t()[:, :30]), _f64(wide) @ _f64(w).T[:, :30]),
        (gemm.tn(wide, x.reshape(10, 48)), _f64(wide).T @ _f64(x).reshape(10, 48)),
        (gemm.tn(wide.t().contiguous().t(), wide[:, :7]), _f64(wide).T @ _f64(wide)[:, :7]),
        (gemm.addmm(w_t, w_t[:, :8], wide[:8], 0.5), _f64(w_t) + 0.5 * _f64(w_t)[:, :8] @ _f64(wide)[:8]),
    ]
    for got, expected in cases:
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert rel_err(got.numpy(), expected) <= 1e-6


@pytest.mark.parametrize("needs", ["all", "input", "weight", "bias"])
@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_linear_gradients_match_float64(engine: str, needs: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 24, generator=gen).requires_grad_(needs in ("all", "input"))
    w = torch.randn(16, 24, generator=gen).requires_grad_(needs in ("all", "weight"))
    bias = torch.randn(16, generator=gen).requires_grad_(needs in ("all", "bias"))
    dy = torch.randn(3, 4, 16, generator=gen)
    y = gemm.linear(x, w, bias)
    assert (type(y.grad_fn).__name__ == "LinearFunctionBackward") == (engine == "onednn")
    y.backward(dy)
    x64, w64, dy64 = _f64(x).reshape(12, 24), _f64(w), _f64(dy).reshape(12, 16)
    expected = {"x": (dy64 @ w64).reshape(3, 4, 24), "w": dy64.T @ x64, "bias": dy64.sum(0)}
    for name, tensor in (("x", x), ("w", w), ("bias", bias)):
        if tensor.requires_grad:
            assert rel_err(tensor.grad.numpy(), expected[name]) <= 1e-6, name
        else:
            assert tensor.grad is None, name


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize(("case", "layer"), PAIRS, ids=[f"{c}-{lay}" for c, lay in PAIRS])
def test_every_kind_matches_reference_on_each_library(case: str, layer: str, engine: str) -> None:
    reason = available(case, layer)
    if reason:
        pytest.skip(reason)
    check_against_reference(case, layer, torch.float32)


def _choice(monkeypatch, engine: str, machine: str, vendor: str, available: bool = True) -> bool:
    gemm._decide.cache_clear()
    monkeypatch.setattr(gemm, "ENGINE", engine)
    monkeypatch.setattr(gemm.platform, "machine", lambda: machine)
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(gemm, "onednn_available", lambda: available)
    try:
        return gemm.use_onednn()
    finally:
        gemm._decide.cache_clear()


def test_auto_picks_onednn_only_on_non_intel_x86(monkeypatch) -> None:
    assert _choice(monkeypatch, "auto", "x86_64", "AuthenticAMD")
    assert _choice(monkeypatch, "auto", "AMD64", "HygonGenuine")
    assert not _choice(monkeypatch, "auto", "x86_64", "GenuineIntel")
    assert not _choice(monkeypatch, "auto", "x86_64", "")  # vendor unknown: torch's own path
    assert not _choice(monkeypatch, "auto", "aarch64", "")
    assert not _choice(monkeypatch, "auto", "x86_64", "AuthenticAMD", available=False)
    assert _choice(monkeypatch, "onednn", "aarch64", "")
    assert not _choice(monkeypatch, "onednn", "x86_64", "AuthenticAMD", available=False)
    assert not _choice(monkeypatch, "blas", "x86_64", "AuthenticAMD")
    with pytest.raises(ValueError, match=r"PEFTDECL_CPU_GEMM.*'mkl'"):
        _choice(monkeypatch, "mkl", "x86_64", "AuthenticAMD")


def test_only_large_cpu_float32_products_go_to_onednn(monkeypatch) -> None:
    monkeypatch.setattr(gemm, "use_onednn", lambda: True)
    monkeypatch.setattr(gemm, "MIN_WORK", 1 << 22)  # the library's default (conftest lowers it to 0)
    big, small = torch.ones(2, 2), torch.ones(2, 2, dtype=torch.float64)
    assert gemm.routes_to_onednn(256, 128, 128, big, big)
    assert not gemm.routes_to_onednn(64, 64, 64, big, big)  # under MIN_WORK
    assert not gemm.routes_to_onednn(256, 128, 128, big, small)
    assert not gemm.routes_to_onednn(0, 128, 128, big, big)
    assert not gemm.routes_to_onednn(128, 128, 128, big, big)  # 2^21 multiply-adds: about even, BLAS kept


def test_only_plain_hookless_linear_modules_are_taken_over(monkeypatch) -> None:
    from transformers.pytorch_utils import Conv1D

    class Subclass(torch.nn.Linear):
        pass

    monkeypatch.setattr(gemm, "use_onednn", lambda: True)
    plain, x = torch.nn.Linear(4, 3), torch.ones(2, 4)
    assert gemm.takes_over(plain, x) and gemm.takes_over(Conv1D(3, 4), x)
    assert not gemm.takes_over(plain, x.double()) and not gemm.takes_over(plain, x.bfloat16())
    assert not gemm.takes_over(Subclass(4, 3), x) and not gemm.takes_over(torch.nn.Conv1d(4, 3, 1), x)
    handle = plain.register_forward_hook(lambda *args: None)
    assert not gemm.takes_over(plain, x)
    handle.remove()
    monkeypatch.setattr(gemm, "use_onednn", lambda: False)
    assert not gemm.takes_over(plain, x)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_second_derivatives_match_float64(engine: str) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, generator=gen, requires_grad=True)
    w = torch.randn(3, 8, generator=gen, requires_grad=True)
    (grad,) = torch.autograd.grad(gemm.linear(x, w).square().sum(), x, create_graph=True)
    grad.sum().backward()
    x64, w64 = _f64(x), _f64(w)  # the expected values: float64 autograd through torch's own products
    x_ref = torch.tensor(x64, requires_grad=True)
    w_ref = torch.tensor(w64, requires_grad=True)
    (g_ref,) = torch.autograd.grad((x_ref @ w_ref.t()).square().sum(), x_ref, create_graph=True)
    g_ref.sum().backward()
    assert rel_err(grad.detach().numpy(), g_ref.detach().numpy()) <= 1e-6
    assert rel_err(w.grad.numpy(), w_ref.grad.numpy()) <= 1e-6


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_autocast_and_torch_func_keep_torch_products(engine: str) -> None:
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.routes_to_onednn(6, 8, 5, x, w)
        assert gemm.linear(x, w).dtype == torch.bfloat16  # as F.linear under autocast
    grads = torch.func.grad(lambda inp: gemm.linear(inp, w).square().sum())(x)
    assert rel_err(grads.numpy(), 2 * (_f64(x) @ _f64(w).T) @ _f64(w)) <= 1e-6


def test_vendor_from_the_processor_description_without_proc_cpuinfo(monkeypatch) -> None:
    import builtins

    def no_cpuinfo(path, *args, **kwargs):
        raise OSError(path)

    gemm.cpu_vendor.cache_clear()
    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(
        gemm.platform, "processor", lambda: "AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD"
    )
    try:
        assert gemm.cpu_vendor() == "AuthenticAMD"
        gemm.cpu_vendor.cache_clear()
        monkeypatch.setattr(gemm.platform, "processor", lambda: "")
        assert gemm.cpu_vendor() == ""
    finally:
        gemm.cpu_vendor.cache_clear()
