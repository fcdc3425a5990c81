"""The torch backend's CUDA-kernel dispatch, checked on the CPU (no GPU, no CuPy launch).

A fake kernel object (:class:`TorchKernels`) computes what each kernel's source states, with torch ops and the
kernels' own index conventions (the BOFT factor's folded permutation, bitsandbytes' nibble order). With it:
the dispatch decisions (the PEFTDECL_CUDA_KERNELS switch, CPU tensors, dtypes and sizes the kernels do not take),
the autograd Functions' wiring by ``torch.autograd.gradcheck`` in float64, their forwards against the NumPy
float64 reference, whole adapted models with the hooks routed to the fake against the torch path, and the
4-bit dequantisation's layout against bitsandbytes' own dequantisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import peftdecl
from tests.conftest import selected_backends

torch = pytest.importorskip("torch")

from peftdecl_torch import cuda_functions as fn  # noqa: E402
from peftdecl_torch import cuda_kernels  # noqa: E402
from tests.cuda_torch_double import TorchKernels, routed_to_double  # noqa: E402

if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

F64 = torch.float64


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[TorchKernels]:
    """The hooks routed to a fresh :class:`TorchKernels`, CPU tensors counted as the kernels' device."""
    with routed_to_double(monkeypatch) as kernels:
        yield kernels


def rand(*shape: int, seed: int = 0, grad: bool = True) -> Any:
    t = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(grad)


# -- dispatch decisions --------------------------------------------------------------------------------------
def test_switch_off_forces_the_torch_path(fake: TorchKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftdecl_torch.kinds._rotation import rotate_blocks

    x, r = rand(5, 8), rand(2, 4, 4, seed=1)
    on = rotate_blocks(x, r)
    assert fake.calls["rotate"] == 1
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    cuda_kernels.refresh()
    assert cuda_kernels.kernels() is None
    off = rotate_blocks(x, r)
    assert fake.calls["rotate"] == 1  # not called again
    assert torch.allclose(on, off, rtol=0, atol=1e-12)  # float64, the same products in another order


def test_cpu_tensors_are_never_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftdecl_torch.kinds._rotation import cayley, rotate_blocks

    monkeypatch.setenv(cuda_kernels.ENV, "1")
    cuda_kernels.refresh()
    kernels = TorchKernels()
    with cuda_kernels.use_kernels(kernels):
        assert cuda_kernels.DEVICE_TYPE == "cuda"
        rotate_blocks(rand(3, 8), rand(2, 4, 4))
        cayley(rand(2, 4, 4))
    cuda_kernels.refresh()
    assert not kernels.calls


def test_unsupported_dtype_and_sizes_fall_back(fake: TorchKernels) -> None:
    from peftdecl_torch.kinds._rotation import cayley, rotate_blocks

    half = rotate_blocks(rand(3, 8).half(), rand(2, 4, 4).half())  # float16 has no entry point
    wide = rotate_blocks(rand(2, 130), rand(2, 65, 65))  # blocks wider than the kernel's 64
    cayley(rand(1, 65, 65))
    assert half.dtype == torch.float16 and wide.shape == (2, 130)
    assert not fake.calls


def test_switch_reads_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    cuda_kernels.refresh()
    assert not cuda_kernels.switched_on()
    monkeypatch.setenv(cuda_kernels.ENV, "1")
    assert not cuda_kernels.switched_on()  # decided once, until refresh()
    cuda_kernels.refresh()
    assert cuda_kernels.switched_on()
    cuda_kernels.refresh()


# -- autograd Functions: gradcheck (float64 finite differences) and forward vs the NumPy reference ---------------
def skew(m: int, b: int, seed: int) -> Any:
    u = rand(m, b, b, seed=seed, grad=False) * 0.3
    return (u - u.transpose(1, 2)).requires_grad_(True)


def test_rotate_blocks_function(fake: TorchKernels) -> None:
    from peftdecl_numpy.rotation import rotate_blocks as reference

    x, r = rand(7, 3 * 5), rand(3, 5, 5, seed=1)
    assert torch.autograd.gradcheck(lambda a, b: fn.apply(fn.RotateBlocks, a, b, fake), (x, r))
    got = fn.apply(fn.RotateBlocks, x, r, fake).detach().numpy()
    np.testing.assert_allclose(got, reference(x.detach().numpy(), r.detach().numpy()), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("width", "blocks", "size", "factors"), [(16, 4, 4, 2), (32, 8, 4, 3), (12, 3, 4, 1)]
)
def test_butterfly_function_against_the_reference(
    fake: TorchKernels, width: int, blocks: int, size: int, factors: int
) -> None:
    from peftdecl.plan.kinds.boft import butterfly_perms
    from peftdecl_numpy.kinds.boft import butterfly as reference
    from peftdecl_torch.kinds._rotation import butterfly_perms as torch_perms

    perms = torch_perms(width, blocks, size, factors, torch.device("cpu"))
    x, q = rand(5, width), rand(factors, blocks, size, size, seed=2)
    idx = [None if pair is None else pair[1].to(torch.int32) for pair in perms]
    # the host-side tables handed to the kernel: p⁻¹ of the NumPy reference's permutations
    for table, perm in zip(idx, butterfly_perms(width, blocks, size, factors), strict=True):
        expected = np.argsort(perm)
        if table is None:
            assert np.array_equal(perm, np.arange(width))
        else:
            assert np.array_equal(table.numpy(), expected)
    assert torch.autograd.gradcheck(lambda a, b: fn.apply(fn.Butterfly, a, b, idx, fake), (x, q))
    want, _ = reference(x.detach().numpy(), q.detach().numpy(), butterfly_perms(width, blocks, size, factors))
    got = fn.apply(fn.Butterfly, x, q, idx, fake).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)  # float64


def test_cayley_function(fake: TorchKernels) -> None:
    from peftdecl_numpy.rotation import cayley as reference

    s = skew(3, 4, seed=3)
    assert torch.autograd.gradcheck(lambda a: fn.apply(fn.Cayley, a, fake), (s,))
    batched = skew(6, 4, seed=4).detach().reshape(2, 3, 4, 4)  # BOFT's [N, D, H, H]
    got = fn.apply(fn.Cayley, batched, fake).numpy()
    np.testing.assert_allclose(got, reference(batched.numpy()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("terms", [1, 2, 5])
def test_neumann_function(fake: TorchKernels, terms: int) -> None:
    from peftdecl.plan.kinds.oft import neumann_coefficients
    from peftdecl_numpy.rotation import neumann as reference

    q, coeffs = skew(3, 4, seed=5), neumann_coefficients(terms)
    assert torch.autograd.gradcheck(lambda a: fn.apply(fn.Neumann, a, coeffs, fake), (q,))
    got = fn.apply(fn.Neumann, q, coeffs, fake).detach().numpy()
    np.testing.assert_allclose(got, reference(q.detach().numpy(), terms), rtol=0, atol=1e-12)


def test_scale_columns_function(fake: TorchKernels) -> None:
    y, scale = rand(2, 3, 6), rand(6, seed=1)
    assert torch.autograd.gradcheck(lambda a, b: fn.apply(fn.ScaleColumns, a, b, fake), (y, scale))
    assert fake.calls["scale_columns_backward"] > 0


@pytest.mark.parametrize("merged", [False, True])
def test_vera_function(fake: TorchKernels, merged: bool) -> None:
    x, weight, bias = rand(2, 3, 6), rand(5, 6, seed=1, grad=False), rand(5, seed=2, grad=False)
    a, b = rand(4, 6, seed=3, grad=False), rand(5, 4, seed=4, grad=False)
    lam_d, lam_b = rand(4, seed=5), rand(5, seed=6)

    def run(x: Any, lam_d: Any, lam_b: Any) -> Any:
        return fn.apply(fn.VeraLinear, x, weight, bias, a, b, lam_d, lam_b, merged, fake)

    assert torch.autograd.gradcheck(run, (x, lam_d, lam_b))
    # the reference formula y = x Wᵀ + b + λ_b ⊙ B (λ_d ⊙ A x)
    want = x @ weight.t() + bias + ((x @ a.t()) * lam_d) @ (b * lam_b[:, None]).t()
    assert torch.allclose(run(x, lam_d, lam_b), want, rtol=0, atol=1e-12)


def test_loha_function(fake: TorchKernels) -> None:
    a1, b1, a2, b2 = rand(5, 2), rand(2, 7, seed=1), rand(5, 3, seed=2), rand(3, 7, seed=3)
    assert torch.autograd.gradcheck(lambda *t: fn.apply(fn.LohaDelta, *t, 0.75, fake), (a1, b1, a2, b2))


def test_kron_function(fake: TorchKernels) -> None:
    from peftdecl_numpy.kinds.lokr import kron_grads

    w1, w2, g = rand(2, 3), rand(4, 5, seed=1), rand(8, 15, seed=2, grad=False)
    assert torch.autograd.gradcheck(lambda a, b: fn.apply(fn.KronDelta, a, b, 0.5, fake), (w1, w2))
    dw1, dw2 = torch.autograd.grad(fn.apply(fn.KronDelta, w1, w2, 0.5, fake), (w1, w2), g)
    want1, want2 = kron_grads(w1.detach().numpy(), w2.detach().numpy(), 0.5 * g.numpy())
    np.testing.assert_allclose(dw1.numpy(), want1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dw2.numpy(), want2, rtol=0, atol=1e-12)


# -- whole models: the hooks routed to the fake give the torch path's outputs and gradients ----------------------
MODELS = {
    "oft": (
        {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "init_weights": False, "use_cayley_neumann": False},
        {"rotate", "rotate_tn", "skew_solve"},
    ),
    "oft_neumann": (
        {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "init_weights": False, "use_cayley_neumann": True},
        {"rotate", "neumann"},
    ),
    "boft": (
        {"peft_type": "BOFT", "boft_block_size": 2, "boft_n_butterfly_factor": 2, "init_weights": False},
        {"butterfly_factor", "butterfly_factor_tn", "skew_solve"},
    ),
    "ia3": (
        {"peft_type": "IA3", "feedforward_modules": ["lin1"], "init_ia3_weights": False},
        {"scale_columns", "scale_columns_backward"},
    ),
    "vera": ({"peft_type": "VERA", "r": 4, "init_weights": False}, {"lowrank_add"}),
    # 16 tokens: W' = W + ΔW pays (16 · (12 + 16) ≥ 12 · 16), the merged form of the VeRA Function
    "vera_merged": ({"peft_type": "VERA", "r": 4, "init_weights": False}, {"lowrank_add"}),
    "loha": (
        {"peft_type": "LOHA", "r": 3, "alpha": 6, "init_weights": False},
        {"loha_delta", "loha_backward"},
    ),
    "lokr": (
        {"peft_type": "LOKR", "r": 3, "alpha": 6, "init_weights": False},
        {"kron_delta", "kron_backward"},
    ),
}


def run_model(spec: dict[str, Any], tokens: int, dtype: Any = F64) -> tuple[Any, dict[str, Any]]:
    """Output and gradients of the MLP adapted by ``spec`` (float64 unless ``dtype``), on ``tokens`` inputs."""
    from tests.torch_mlp import torch_mlp

    base = torch_mlp(0).to(dtype)
    model = peftdecl.attach(base, {**spec, "target_modules": ["lin0", "lin1"]}, "a", "torch", seed=3)
    x = torch.linspace(-1.0, 1.0, tokens * 12, dtype=dtype).reshape(tokens, 12)
    y = model(x)
    (y * torch.linspace(0.5, 1.5, y.numel(), dtype=dtype).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.base_model.named_parameters() if p.grad is not None}
    return y.detach(), grads


@pytest.mark.parametrize("case", sorted(MODELS))
def test_models_with_kernels_equal_the_torch_path(
    case: str, fake: TorchKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, expected_calls = MODELS[case]
    tokens = 16 if case.endswith("merged") else 4
    y_kernels, g_kernels = run_model(spec, tokens)
    assert expected_calls <= set(fake.calls), dict(fake.calls)
    monkeypatch.setenv(cuda_kernels.ENV, "0")
    cuda_kernels.refresh()
    calls = sum(fake.calls.values())
    y_torch, g_torch = run_model(spec, tokens)
    assert sum(fake.calls.values()) == calls  # switched off: the fake is not called
    assert g_kernels.keys() == g_torch.keys() and g_torch
    # float64 throughout: the kernel path and the torch path differ only by summation order
    assert torch.allclose(y_kernels, y_torch, rtol=0, atol=1e-10)
    for name, grad in g_torch.items():
        assert torch.allclose(g_kernels[name], grad, rtol=1e-9, atol=1e-10), name


# -- 4-bit dequantisation: the kernel's layout against bitsandbytes ----------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_4bit_dequantisation_layout_matches_bitsandbytes(
    fake: TorchKernels, quant_type: str, double: bool
) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from peftdecl_torch.quantized import dequantized_weight

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        128, 48, compute_dtype=torch.float32, compress_statistics=double, quant_type=quant_type
    )
    layer.load_state_dict(torch.nn.Linear(128, 48).state_dict())
    layer = layer.to("cpu")  # quantises; no forward, so the weight keeps bitsandbytes' ordinary layout
    state = layer.weight.quant_state
    got = dequantized_weight(layer)
    assert fake.calls["nf4_dequant"] == 1 and fake.calls["absmax_dequant"] == int(double)
    want = bnb.functional.dequantize_4bit(layer.weight.data, state)
    assert got.dtype == want.dtype and got.shape == want.shape
    # float32 products of the same two factors; double quantisation's scales are summed in another order
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_kernel_object_needs_every_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """With CuPy importable, the kernel object exists only while every kernel source the hooks launch is there."""
    pytest.importorskip("cupy")
    import peftdecl_cupy._modules as modules

    monkeypatch.setenv(cuda_kernels.ENV, "1")
    cuda_kernels.refresh()
    assert cuda_kernels.kernels() is not None
    monkeypatch.setattr(modules, "KERNEL_DIR", tmp_path)  # a folder without the sources
    cuda_kernels.refresh()
    assert cuda_kernels.kernels() is None
    cuda_kernels.refresh()


def test_qlora_inference_builds_the_merged_weight_from_the_codes(
    fake: TorchKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoRA over a 4-bit layer, no gradients, many tokens: W' = dequant(W) + s·B A (the fused kernel's contract)
    and one product, against bitsandbytes' own layer plus the LoRA update (switch off)."""
    bnb = pytest.importorskip("bitsandbytes")
    from tests.conftest import rel_err

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type="nf4")

        def forward(self, x: Any) -> Any:
            return self.lin(x)

    torch.manual_seed(0)
    net = Net()
    net.lin.load_state_dict(torch.nn.Linear(64, 48).state_dict())
    net = net.to("cpu").eval()
    net.lin.support_avx512bf16_for_cpu = False  # keep bitsandbytes' ordinary layout on AVX512-BF16 CPUs
    spec = {"peft_type": "LORA", "r": 4, "target_modules": ["lin"], "init_lora_weights": False}
    model = peftdecl.attach(net, spec, "a", "torch", seed=2)
    model.eval()
    x = torch.randn(
        40, 64, generator=torch.Generator().manual_seed(1)
    )  # 40 · (64 + 48) ≥ 64 · 48: merge pays
    with torch.no_grad():
        got = model(x)
        assert fake.calls["nf4_lowrank"] == 1
        monkeypatch.setenv(cuda_kernels.ENV, "0")
        cuda_kernels.refresh()
        want = model(x)
        few = model(x[:3])  # three tokens: bitsandbytes' own path (merging would not pay)
    assert fake.calls["nf4_lowrank"] == 1
    # float32 both ways: the merged product and bitsandbytes' dequantised product plus LoRA's two
    assert rel_err(got.numpy(), want.numpy()) <= 1e-5
    assert few.shape == (3, 48)
