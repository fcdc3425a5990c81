"""The OFT/BOFT, IA3, VeRA, LoHa/LoKr and 4-bit kernels on a CUDA device (skipped without one).

Each kernel against the NumPy float64 reference on fresh random inputs, outputs filled with NaN before the launch
(an element the kernel never writes stays NaN and fails the comparison), odd sizes and the block/rank limits;
float32 within 1e-5 and bfloat16 within 2e-2 (relative Frobenius error, :func:`tests.conftest.rel_err`). Then the
torch hooks on CUDA tensors: forward and gradients of each hooked function with the kernels against torch autograd
of the same formula in float64 with the kernels switched off; LoRA, AdaLoRA and DoRA models with the low-rank
kernels on and off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import rel_err

cupy = pytest.importorskip("cupy")

from peftdecl_cupy._device import unavailable_reason  # noqa: E402

_WHY = unavailable_reason()
if _WHY:
    pytest.skip(f"no CUDA device for the kernels: {_WHY}", allow_module_level=True)

from tests import cuda_kernel_cases as cases  # noqa: E402

F32_TOL = cases.F32_TOL
DTYPES = ["f32", "bf16"]
xp = cupy


# -- each kernel against the NumPy float64 reference (tests.cuda_kernel_cases; odd sizes and the limits) ---------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "n", "b", "shared"), [(37, 3, 5, False), (4099, 2, 64, False), (300, 7, 1, True)]
)
@pytest.mark.parametrize("transpose", [False, True])
def test_rotate_blocks(dtype: str, rows: int, n: int, b: int, shared: bool, transpose: bool) -> None:
    cases.check_rotate_blocks(xp, dtype, rows, n, b, shared, transpose)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n", "b"), [(2500, 3, 7), (9, 2, 64), (2048, 32, 32)])
def test_block_tn(dtype: str, rows: int, n: int, b: int) -> None:
    cases.check_block_tn(xp, dtype, rows, n, b)


@pytest.mark.parametrize("b", [1, 7, 32, 64])
def test_cayley(b: int) -> None:
    cases.check_cayley(xp, b)


@pytest.mark.parametrize(("terms", "b"), [(1, 4), (5, 9), (8, 64)])
def test_neumann(terms: int, b: int) -> None:
    cases.check_neumann(xp, terms, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("width", "blocks", "size", "factors"), [(24, 6, 4, 2), (64, 8, 8, 4), (40, 5, 8, 1)]
)
def test_butterfly(dtype: str, width: int, blocks: int, size: int, factors: int) -> None:
    cases.check_butterfly(xp, dtype, 33, width, blocks, size, factors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d"), [(1030, 45), (3, 4096), (2048, 4096)])
def test_scale_columns(dtype: str, rows: int, d: int) -> None:
    cases.check_scale_columns(xp, dtype, rows, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols", "rank"), [(70, 33, 19), (129, 257, 256), (1, 5, 1)])
def test_lowrank_add(dtype: str, rows: int, cols: int, rank: int) -> None:
    cases.check_lowrank_add(xp, dtype, rows, cols, rank)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("out_f", "in_f", "r1", "r2"), [(37, 29, 3, 5), (64, 300, 256, 1), (1024, 1024, 16, 16)]
)
def test_loha(dtype: str, out_f: int, in_f: int, r1: int, r2: int) -> None:
    cases.check_loha(xp, dtype, out_f, in_f, r1, r2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m1", "n1", "p", "q"), [(3, 4, 5, 7), (1, 1, 64, 64), (16, 16, 1, 3), (64, 64, 64, 64)]
)
def test_kron(dtype: str, m1: int, n1: int, p: int, q: int) -> None:
    cases.check_kron(xp, dtype, m1, n1, p, q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "cols", "blocksize", "rank"), [(48, 128, 64, 16), (7, 30, 32, 1), (4096, 4096, 64, 64)]
)
def test_nf4(dtype: str, rows: int, cols: int, blocksize: int, rank: int) -> None:
    cases.check_nf4(xp, dtype, rows, cols, blocksize, rank)


# -- the torch hooks on CUDA tensors: kernels on vs torch autograd of the formula in float64, kernels off ---------
torch = pytest.importorskip("torch")

from peftdecl_torch import cuda_kernels  # noqa: E402


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool], None]]:
    def set_kernels(on: bool) -> None:
        monkeypatch.setenv(cuda_kernels.ENV, "1" if on else "0")
        cuda_kernels.refresh()

    yield set_kernels
    cuda_kernels.refresh()


def hooked_cases() -> dict[str, tuple[Callable[..., Any], Callable[[torch.Generator], tuple[Any, ...]]]]:
    from peftdecl_torch.kinds import _rotation as rot

    def skew(g: torch.Generator, *shape: int) -> Any:
        u = torch.randn(*shape, generator=g) * 0.2
        return u - u.transpose(-1, -2)

    perms = rot.butterfly_perms(48, 6, 8, 2, torch.device("cuda"))
    return {
        "rotate_blocks": (
            rot.rotate_blocks,
            lambda g: (torch.randn(2, 37, 45, generator=g), torch.randn(3, 15, 15, generator=g)),
        ),
        "butterfly": (
            lambda x, q: rot.butterfly(x, q, perms),
            lambda g: (torch.randn(3, 11, 48, generator=g), torch.randn(2, 6, 8, 8, generator=g)),
        ),
        "cayley": (rot.cayley, lambda g: (skew(g, 2, 3, 9, 9),)),
        "neumann": (lambda q: rot.neumann(q, 6), lambda g: (skew(g, 4, 16, 16),)),
    }


@pytest.mark.parametrize("case", ["rotate_blocks", "butterfly", "cayley", "neumann"])
def test_hooked_functions_forward_and_gradients(case: str, switch: Callable[[bool], None]) -> None:
    function, make = hooked_cases()[case]
    inputs = make(torch.Generator().manual_seed(0))
    weights = torch.Generator().manual_seed(1)

    def run(dtype: torch.dtype) -> tuple[Any, list[Any]]:
        args = [t.detach().to("cuda", dtype).requires_grad_(True) for t in inputs]
        y = function(*args)
        w = torch.randn(y.shape, generator=weights.manual_seed(1)).to("cuda", dtype)
        (y * w).sum().backward()
        return y.detach().double().cpu(), [a.grad.double().cpu() for a in args]

    switch(True)
    y, grads = run(torch.float32)
    switch(False)
    y_ref, grads_ref = run(torch.float64)
    assert rel_err(y.numpy(), y_ref.numpy()) <= F32_TOL
    for got, want in zip(grads, grads_ref, strict=True):
        assert rel_err(got.numpy(), want.numpy()) <= F32_TOL


def _formula_cases() -> dict[str, tuple[Any, Callable[..., Any], int]]:
    """name -> (Function, the same formula in torch ops, how many leading inputs get gradients)."""
    from peftdecl_torch import cuda_functions as fn

    def vera(x: Any, lam_d: Any, lam_b: Any, w: Any, bias: Any, a: Any, b: Any) -> Any:
        return x @ w.t() + bias + ((x @ a.t()) * lam_d) @ (b * lam_b[:, None]).t()

    return {
        "ScaleColumns": (fn.ScaleColumns, lambda y, s: y * s, 2),
        "VeraLinear": (fn.VeraLinear, vera, 3),
        "LohaDelta": (fn.LohaDelta, lambda a1, b1, a2, b2: 0.75 * (a1 @ b1) * (a2 @ b2), 4),
        "KronDelta": (fn.KronDelta, lambda w1, w2: 0.5 * torch.kron(w1, w2), 2),
    }


def _formula_inputs(name: str, g: torch.Generator) -> list[Any]:
    shapes = {
        "ScaleColumns": [(3, 37, 45), (45,)],
        "VeraLinear": [(2, 19, 45), (8,), (33,), (33, 45), (33,), (8, 45), (33, 8)],
        "LohaDelta": [(37, 3), (3, 29), (37, 5), (5, 29)],
        "KronDelta": [(3, 4), (5, 7)],
    }[name]
    return [torch.randn(*shape, generator=g) for shape in shapes]


@pytest.mark.parametrize(
    ("name", "merged"),
    [
        ("ScaleColumns", False),
        ("VeraLinear", False),
        ("VeraLinear", True),
        ("LohaDelta", False),
        ("KronDelta", False),
    ],
)
def test_functions_on_cuda_tensors(name: str, merged: bool) -> None:
    """Each Function with the CuPy kernels (float32) against torch autograd of its formula in float64."""
    from peftdecl_torch import cuda_functions as fn
    from peftdecl_torch.cuda_bridge import CupyKernels

    function, formula, trained = _formula_cases()[name]
    inputs = _formula_inputs(name, torch.Generator().manual_seed(0))

    def run(dtype: torch.dtype, kernels: bool) -> tuple[Any, list[Any]]:
        args = [t.detach().to("cuda", dtype).requires_grad_(i < trained) for i, t in enumerate(inputs)]
        if not kernels:
            y = formula(*args)
        elif name == "VeraLinear":  # (x, weight, bias, a, b, lam_d, lam_b) in the Function's order
            x, lam_d, lam_b, w, bias, a, b = args
            y = fn.apply(function, x, w, bias, a, b, lam_d, lam_b, merged, CupyKernels())
        elif name in ("LohaDelta", "KronDelta"):
            y = fn.apply(function, *args, 0.75 if name == "LohaDelta" else 0.5, CupyKernels())
        else:
            y = fn.apply(function, *args, CupyKernels())
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
        (y * weights).sum().backward()
        return y.detach().double().cpu(), [a.grad.double().cpu() for a in args[:trained]]

    y, grads = run(torch.float32, True)
    y_ref, grads_ref = run(torch.float64, False)
    assert rel_err(y.numpy(), y_ref.numpy()) <= F32_TOL
    for got, want in zip(grads, grads_ref, strict=True):
        assert rel_err(got.numpy(), want.numpy()) <= F32_TOL


@pytest.mark.parametrize("double", [False, True])
def test_4bit_weight_dequantised_on_cuda_as_bitsandbytes(
    double: bool, switch: Callable[[bool], None]
) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from peftdecl_torch.quantized import dequantized_weight

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        256, 96, compute_dtype=torch.float32, compress_statistics=double, quant_type="nf4"
    )
    layer.load_state_dict(torch.nn.Linear(256, 96).state_dict())
    layer = layer.to("cuda")
    switch(True)
    got = dequantized_weight(layer)
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # float32 products of the same code and scale; double quantisation's scales summed in another order
    assert got.dtype == want.dtype and rel_err(got.cpu().numpy(), want.cpu().numpy()) <= 1e-6


def test_qlora_inference_on_cuda_equals_bitsandbytes_plus_lora(switch: Callable[[bool], None]) -> None:
    """LoRA over a 4-bit layer, no gradients, many tokens: the merged weight built from the codes by the fused
    kernel and one GEMM, against bitsandbytes' layer plus the LoRA products (kernels off)."""
    bnb = pytest.importorskip("bitsandbytes")
    import peftdecl

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = bnb.nn.Linear4bit(512, 384, compute_dtype=torch.float32, quant_type="nf4")

        def forward(self, x: Any) -> Any:
            return self.lin(x)

    torch.manual_seed(0)
    net = Net()
    net.lin.load_state_dict(torch.nn.Linear(512, 384).state_dict())
    net = net.to("cuda").eval()
    net.lin.support_avx512bf16_for_cpu = False  # (a CPU-only repacking; inert on CUDA)
    spec = {"peft_type": "LORA", "r": 16, "target_modules": ["lin"], "init_lora_weights": False}
    model = peftdecl.attach(net, spec, "a", "torch", seed=2)
    model.eval()
    x = torch.randn(1024, 512, generator=torch.Generator().manual_seed(1)).to("cuda")
    with torch.no_grad():
        switch(True)
        got = model(x).cpu().numpy()
        switch(False)
        want = model(x).cpu().numpy()
    assert rel_err(got, want) <= F32_TOL


class _CountedKernels:
    """The real kernel object, each low-rank entry point counted (proof that the hooks took the kernels)."""

    def __init__(self) -> None:
        from peftdecl_torch.cuda_bridge import CupyKernels

        self.inner, self.calls = CupyKernels(), dict.fromkeys(("shrink", "expand", "outer", "dora_output"), 0)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name)
        if name not in self.calls:
            return found

        def counted(*args: Any) -> Any:
            self.calls[name] += 1
            return found(*args)

        return counted


@pytest.mark.parametrize("kind", ["lora", "adalora", "dora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lowrank_kinds_on_cuda_tensors_with_kernels_on_and_off(
    kind: str, dtype: str, switch: Callable[[bool], None]
) -> None:
    """A two-layer MLP adapted by LoRA/AdaLoRA/DoRA on CUDA tensors, 64 tokens (folding B A into W does not pay),
    with the low-rank kernels and without (the torch path). float32: outputs and gradients within 1e-5 of each
    other. bfloat16: each against the float64 run of the same (bfloat16-valued) weights and input; the first
    layer's gradients pass through the second layer's bfloat16 dx and sum 64 tokens, so the torch path itself is
    a few percent off there: the kernels must be within 2e-2, or no worse than 1.25 times the torch path's error.
    DoRA over a bfloat16 base keeps the torch path (float32 magnitudes)."""
    import peftdecl

    torch_dtype = getattr(torch, dtype)
    spec = {
        "lora": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "init_lora_weights": False},
        "adalora": {"peft_type": "ADALORA", "init_r": 12, "target_r": 8, "lora_alpha": 24, "total_step": 10,
                    "init_lora_weights": False},
        "dora": {"peft_type": "LORA", "r": 16, "use_dora": True, "init_lora_weights": False},
    }[kind]  # fmt: skip

    def run(compute: torch.dtype) -> tuple[Any, list[Any]]:
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.ReLU(), torch.nn.Linear(384, 128))
        base = base.to("cuda", torch_dtype).to(compute)
        model = peftdecl.attach(base, {**spec, "target_modules": ["0", "2"]}, "a", "torch", seed=3)
        x = torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(1)).to("cuda", torch_dtype)
        y = model(x.to(compute))
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to("cuda", torch.float64)
        (y.double() * w).sum().backward()
        params = [p for p in model.base_model.parameters() if p.grad is not None]
        return y.detach().double().cpu(), [p.grad.double().cpu() for p in params]

    switch(True)
    counted = _CountedKernels()
    with cuda_kernels.use_kernels(counted):  # type: ignore[arg-type]
        on = run(torch_dtype)
    covered = not (kind == "dora" and dtype == "bfloat16")
    assert (counted.calls["shrink"] > 0) == covered, counted.calls
    assert (counted.calls["dora_output"] > 0) == (covered and kind == "dora")
    switch(False)
    off = run(torch_dtype)
    assert len(on[1]) == len(off[1]) > 0
    pairs = [(on[0], off[0]), *zip(on[1], off[1], strict=True)]
    if dtype == "float32":
        for got, want in pairs:
            assert rel_err(got.numpy(), want.numpy()) <= F32_TOL
        return
    ref = run(torch.float64)
    for (got, torch_path), exact in zip(pairs, [ref[0], *ref[1]], strict=True):
        err, torch_err = rel_err(got.numpy(), exact.numpy()), rel_err(torch_path.numpy(), exact.numpy())
        assert err <= max(2e-2, 1.25 * torch_err), (err, torch_err)
