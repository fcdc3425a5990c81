"""The torch backend's hand-written linear-layer Functions in every form their cost rules can pick, against the
float64 NumPy reference and torch.autograd.gradcheck.

peftdecl_torch.kinds._fused picks a form by token count and layer size (merged weight or not for LoRA/AdaLoRA,
rotated weight or rotated input for OFT) and OFT's backward pass by how close R is to orthogonal; on the tiny
shapes here each form is forced in turn through the engine options (``PEFTDECL_FUSED_MERGED`` and
``PEFTDECL_HALF_COMPUTE`` set the defaults of the engine each test creates). Tolerances as in tests/torch_cases.py:
float32 ≤ 1e-5, float64 ≤ 1e-10 relative; gradcheck in float64 with its default tolerances.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import rel_err

torch = pytest.importorskip("torch")

from peftdecl_torch.kinds import _fused as fused  # noqa: E402
from peftdecl_torch.kinds import dora as torch_dora  # noqa: E402
from peftdecl_torch.kinds import lora as torch_lora  # noqa: E402
from peftdecl_torch.kinds import oft as torch_oft  # noqa: E402
from tests.torch_cases import TOL, available, build  # noqa: E402

FORCED = [
    (case, layer)
    for case, layers in {
        "lora": ("linear", "gpt2_conv1d"),
        "lora_rslora": ("linear",),
        "lora_bias": ("linear", "gpt2_conv1d"),
        "adalora": ("linear", "gpt2_conv1d"),
        "adalora_masked": ("linear",),
        "ia3": ("linear", "gpt2_conv1d"),
        "oft": ("linear",),
        "oft_exact_cayley": ("linear",),
        "oft_block_share_coft": ("linear",),
    }.items()
    for layer in layers
]


def _check_against_reference(
    case: str, layer: str, dtype, function: str | None = None, merged: bool | None = None
) -> None:
    reason = available(case, layer)
    if reason:
        pytest.skip(reason)
    ours, reference, x, xt = build(case, layer, dtype)
    tol = TOL[dtype]
    expected, tape = reference.engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=expected.shape)
    expected_grads = reference.engine.layer_backward("m", tape, dy)
    with torch.no_grad():
        assert rel_err(ours(xt).numpy(), expected) <= tol
    y = ours(xt)
    if function is not None:  # the form asked for really ran (None: not a hand-written Function)
        assert type(y.grad_fn).__name__ == f"{function}Backward"
    if merged is not None:  # and in the form asked for (the Function's ctx records it)
        assert y.grad_fn.merged is merged
    assert y.is_contiguous()
    assert rel_err(y.detach().numpy(), expected) <= tol
    y.backward(torch.tensor(dy, dtype=dtype))
    for key, param in ours.trainable_parameters().items():
        assert rel_err(param.grad.numpy(), expected_grads[key]) <= tol, key
    assert xt.grad.is_contiguous()
    assert rel_err(xt.grad.numpy(), expected_grads["input"]) <= tol


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("case", "layer"), FORCED, ids=[f"{c}-{lay}" for c, lay in FORCED])
def test_each_form_matches_numpy_reference(case: str, layer: str, dtype, merged: bool, monkeypatch) -> None:
    # merged: LoRA/AdaLoRA fold the update into the weight, OFT rotates the weight; unmerged: the other form
    monkeypatch.setenv("PEFTDECL_FUSED_MERGED", str(merged))
    function, form = None, None
    if case.startswith(("lora", "adalora")):
        function, form = "LoraLinearFunction", merged
    elif case.startswith("oft") and merged:
        function = "OftLinearFunction"
    _check_against_reference(case, layer, dtype, function, form)


@pytest.mark.parametrize("backward", ["inversion", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", ["oft", "oft_exact_cayley", "oft_block_share_coft"])
def test_both_oft_backward_forms_match_numpy_reference(case: str, dtype, backward: str, monkeypatch) -> None:
    monkeypatch.setenv("PEFTDECL_FUSED_MERGED", "true")  # the weight-rotating Function
    if backward == "direct":
        monkeypatch.setattr(torch_oft, "MAX_DEFECT", -1.0)
    else:
        ours, _, _, _ = build(case, "linear", dtype)
        layer = ours.engine.layer("m")
        name = layer.adapter_names[0]
        rot = torch_oft.block_rotations(layer.plan(name), layer, layer.tensors(name)).detach()
        if not torch_oft._invertible(rot):
            pytest.skip("the test rotation is too far from orthogonal for the inversion form")
    _check_against_reference(case, "linear", dtype, "OftLinearFunction")


def _merged_lora(*args):
    """LoRA's Function in its merged form (save_shrink is moot there: u is always kept)."""
    return torch_lora.LoraLinearFunction.apply(*args, True, True)


def _gen_tensor(gen, *shape, grad: bool = True):
    return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("biases", ["none", "base", "lora", "both"])
@pytest.mark.parametrize("layout", ["linear", "gpt2_conv1d"])
def test_merged_lora_function_gradcheck(layout: str, biases: str) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = _gen_tensor(gen, 6, 5, grad=False) if layout == "linear" else _gen_tensor(gen, 5, 6, grad=False)
    args = (
        _gen_tensor(gen, 2, 3, 5),
        weight,
        _gen_tensor(gen, 6, grad=False) if biases in ("base", "both") else None,
        _gen_tensor(gen, 2, 5),
        _gen_tensor(gen, 6, 2),
        _gen_tensor(gen, 6) if biases in ("lora", "both") else None,
        1.5,
        layout == "gpt2_conv1d",
    )
    assert torch.autograd.gradcheck(_merged_lora, args)
    y = _merged_lora(*args)
    expected = torch_lora.LoraLinearFunction.apply(*args)
    assert y.is_contiguous() and torch.allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_merged_lora_function_without_input_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    x, a, b = _gen_tensor(gen, 4, 5, grad=False), _gen_tensor(gen, 2, 5), _gen_tensor(gen, 6, 2)
    weight = _gen_tensor(gen, 6, 5, grad=False)
    assert torch.autograd.gradcheck(
        lambda a_, b_: _merged_lora(x, weight, None, a_, b_, None, 0.5, False),
        (a, b),
    )


def _near_orthogonal(gen, n: int, b: int) -> torch.Tensor:
    noise = 0.03 * torch.randn(n, b, b, generator=gen, dtype=torch.float64)
    return (torch.eye(b, dtype=torch.float64) + noise).requires_grad_()


@pytest.mark.parametrize("needs", ["both", "input", "rotation"])
@pytest.mark.parametrize("backward", ["inversion", "direct"])
def test_oft_function_gradcheck(backward: str, needs: str, monkeypatch) -> None:
    if backward == "direct":
        monkeypatch.setattr(torch_oft, "MAX_DEFECT", -1.0)
    gen = torch.Generator().manual_seed(0)
    x = _gen_tensor(gen, 2, 3, 8, grad=needs != "rotation")
    rot = _near_orthogonal(gen, 2, 4)
    if needs == "input":
        rot.requires_grad_(False)
    weight, bias = _gen_tensor(gen, 6, 8, grad=False), _gen_tensor(gen, 6, grad=False)
    if backward == "inversion":
        assert torch_oft._invertible(rot.detach())
    inputs = tuple(t for t in (x, rot) if t.requires_grad)

    def call(*diff):
        values = iter(diff)
        xi = next(values) if x.requires_grad else x
        ri = next(values) if rot.requires_grad else rot
        return torch_oft.OftLinearFunction.apply(xi, weight, bias, ri, False)

    assert torch.autograd.gradcheck(call, inputs)
    # the forward is the input-rotating definition y = (x R) Wᵀ + b
    expected = torch.nn.functional.linear(torch_oft.rotate_blocks(x, rot), weight, bias)
    assert torch.allclose(call(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_oft_inversion_is_refused_far_from_orthogonal() -> None:
    gen = torch.Generator().manual_seed(2)
    assert torch_oft._invertible(_near_orthogonal(gen, 3, 4).detach())
    assert not torch_oft._invertible(3.0 * torch.randn(3, 4, 4, generator=gen, dtype=torch.float64))


def test_row_slice_helpers_match_plain_products() -> None:
    # sizes where the CPU helpers split the rows (≥ 128·SPLIT_K rows)
    gen = torch.Generator().manual_seed(3)
    rows = 128 * fused.SPLIT_K
    left, right = torch.randn(rows, 3, generator=gen), torch.randn(rows, 10, generator=gen)
    assert torch.allclose(fused.tn(left, right), left.t() @ right, rtol=1e-5, atol=1e-4)
    n, b = 2, 4
    x, g = torch.randn(rows, n * b, generator=gen), torch.randn(rows, n * b, generator=gen)
    expected = torch.stack([x[:, i * b : (i + 1) * b].t() @ g[:, i * b : (i + 1) * b] for i in range(n)])
    assert torch.allclose(torch_oft._blockwise_tn(x, g, n, b), expected, rtol=1e-5, atol=1e-4)
    rot = torch.randn(n, b, b, generator=gen)
    assert torch.allclose(
        torch_oft._rotate_rows_in_place(g.clone(), rot), torch_oft.rotate_blocks(g, rot), rtol=1e-5, atol=1e-5
    )


def test_cost_rules_follow_token_count_and_dtype(monkeypatch) -> None:
    ours, _, _, _ = build("lora", "linear", torch.float32)  # Linear 8 → 6
    layer = ours.engine.layer("m")
    lp = layer.plan(layer.adapter_names[0])
    few, many = torch.zeros(2, 8), torch.zeros(4, 8)  # 2·14 < 48 ≤ 4·14 tokens·(in + out)
    assert not fused.merge_pays(lp, layer, few) and fused.merge_pays(lp, layer, many)
    assert fused.merge_for_training(lp, layer, many)
    assert not fused.merge_for_training(
        lp, layer, many.to(torch.bfloat16)
    )  # W + ΔW rounded to bfloat16 drops ΔW
    assert not fused.rotate_weight_pays(lp, layer, torch.zeros(5, 8)) and fused.rotate_weight_pays(
        lp, layer, torch.zeros(6, 8)
    )
    monkeypatch.setenv("PEFTDECL_FUSED_MERGED", "false")  # read when an engine is created: a new one
    never, _, _, _ = build("lora", "linear", torch.float32)
    layer = never.engine.layer("m")
    assert not fused.merge_pays(lp, layer, many) and not fused.rotate_weight_pays(
        lp, layer, torch.zeros(6, 8)
    )


HALF_TOL = 2e-2  # half-precision products (8-bit mantissa for bfloat16) against float64


@pytest.mark.parametrize("half_compute", [True, False], ids=["base-dtype", "float32-adapter"])
@pytest.mark.parametrize("merged", [False, True], ids=["per-token", "merged"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(
    ("case", "layer"),
    [
        ("lora", "linear"),
        ("lora_bias", "gpt2_conv1d"),
        ("adalora", "linear"),
        ("oft", "linear"),
        ("loha", "linear"),
        ("lokr", "linear"),
        ("dora", "linear"),
        ("dora", "gpt2_conv1d"),
    ],
)
def test_half_precision_base_runs_the_function_in_its_dtype(
    case: str, layer: str, dtype, merged, half_compute, monkeypatch
) -> None:
    """float32 adapters on a half base: the products run in the base dtype (a hand-written Function, or LoHa/LoKr's
    ΔW as its own product), gradients land on the float32 parameters, and both agree with the float64 reference
    on the same half-precision weights and input."""
    reason = available(case, layer)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("PEFTDECL_FUSED_MERGED", str(merged))
    monkeypatch.setenv("PEFTDECL_HALF_COMPUTE", str(half_compute))  # False: HF PEFT's float32 adapter path
    monkeypatch.setattr(torch_dora, "ROW_SLICE_ELEMENTS", 12)  # DoRA's backward in slices of two token rows
    ours, reference, x, _ = build(case, layer, dtype)
    x = x.astype(np.float32)  # the half-precision input, exactly, for the reference
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    x = xt.detach().double().numpy()
    expected, tape = reference.engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=expected.shape)
    expected_grads = reference.engine.layer_backward("m", tape, dy)
    with torch.no_grad():
        assert rel_err(ours(xt).double().numpy(), expected) <= HALF_TOL
    y = ours(xt)
    assert y.dtype == dtype
    if not half_compute:  # the adapter computed in float32 and cast back (OFT: the rotated input cast back)
        assert type(y.grad_fn).__name__ == ("ViewBackward0" if case == "oft" else "ToCopyBackward0")
    elif case in ("lora", "lora_bias", "adalora", "dora") or (case == "oft" and merged):  # OFT: or the input
        assert type(y.grad_fn).__name__.endswith("LinearFunctionBackward")
    elif case in ("loha", "lokr"):  # base product + x ΔWᵀ in the base dtype, no float32 copy of x
        assert type(y.grad_fn).__name__ == "AddBackward0"
    assert rel_err(y.detach().double().numpy(), expected) <= HALF_TOL
    y.backward(torch.tensor(dy, dtype=dtype))
    for key, param in ours.trainable_parameters().items():
        assert param.grad.dtype == torch.float32, key
        assert rel_err(param.grad.double().numpy(), expected_grads[key]) <= HALF_TOL, key
    assert rel_err(xt.grad.double().numpy(), expected_grads["input"]) <= HALF_TOL
