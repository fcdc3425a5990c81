"""DARE's masks on the adapter's device and dtype, as HF PEFT 0.21 draws them (``torch.bernoulli`` of a tensor
``full_like`` the pruned one): bf16 and fp16 adapters on the CPU, and CUDA adapters, combine to PEFT's result
given the same torch seed.

A bf16 ``density`` is rounded (0.7 -> 0.69921875) and the draw then keeps other entries than a float32 draw with
the same seed, so a float32 mask source fails these tests (each layer here has a thousand or more draws).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import peftdecl
from tests.conftest import selected_backends

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

from peftdecl_torch.dare_masks import keep_mask_on  # noqa: E402

R = 16
MODULES = ("lin0", "lin1")
WEIGHTS = [0.7, -0.4]
DENSITY = 0.7


class Wide(torch.nn.Module):
    """lin0 (64 → 64), ReLU, lin1 (64 → 32): factors of a thousand entries, so a wrong mask source shows."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(64, 64)
        self.lin1 = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def config(alpha: int) -> dict[str, object]:
    return {"r": R, "lora_alpha": alpha, "target_modules": list(MODULES), "init_lora_weights": False}


def factors(model: object, name: str) -> dict[str, np.ndarray]:
    out = {}
    for module in MODULES:
        layer = getattr(model.base_model.model, module)  # type: ignore[attr-defined]
        for side in ("A", "B"):
            weight = getattr(layer, f"lora_{side}")[name].weight
            out[f"{module}.lora_{side}.weight"] = weight.detach().double().cpu().numpy()
    return out


Factors = dict[str, np.ndarray]


def combined(dtype: torch.dtype, kind: str, device: str = "cpu") -> tuple[Factors, Factors, list[Factors]]:
    """(peftdecl's, PEFT's) factors of ``kind`` over two ``dtype`` adapters on ``device`` (same torch seed), and
    the two source adapters' factors."""
    torch.manual_seed(0)
    base = Wide()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config(8)), adapter_name="t1")  # type: ignore[arg-type]
    theirs.add_adapter("t2", peft.LoraConfig(**config(16)))  # type: ignore[arg-type]
    theirs = theirs.to(device=device, dtype=dtype)
    ours = peftdecl.attach(
        copy.deepcopy(base).to(device=device, dtype=dtype),
        {"peft_type": "LORA", **config(8)},
        "init",
        "torch",
        autocast_adapter_dtype=False,  # adapters in the base's dtype, as PEFT's after .to(dtype)
    )
    sources = [factors(theirs, "t1"), factors(theirs, "t2")]
    for name, alpha, arrays in (("t1", 8, sources[0]), ("t2", 16, sources[1])):
        ours.add_adapter(name, {"peft_type": "LORA", **config(alpha)}, arrays=arrays)
    torch.manual_seed(21)
    theirs.add_weighted_adapter(["t1", "t2"], WEIGHTS, "dare", combination_type=kind, density=DENSITY)
    torch.manual_seed(21)
    for module in MODULES:  # the CPU draws of PEFT's injection of the new adapter, before its masks
        layer = getattr(base, module)
        torch.nn.Linear(layer.in_features, R, bias=False), torch.nn.Linear(R, layer.out_features, bias=False)
    ours.add_weighted_adapter(["t1", "t2"], WEIGHTS, "dare", combination_type=kind, density=DENSITY)
    return ours.engine.export("dare"), factors(theirs, "dare"), sources


def assert_combination_equal(kind: str, dtype: torch.dtype, device: str = "cpu") -> None:
    got, expected, (t1, t2) = combined(dtype, kind, device)
    # PEFT rounds each pruned t/density to the adapter dtype and then the sum; peftdecl rounds its float64 sum once:
    # within one eps of the dtype (bf16 2⁻⁷, fp16 2⁻¹⁰, float32 2⁻²³) times the layer's largest entry. A mask that
    # keeps another entry is off by a whole term w·t/density (about a third of the largest entry).
    eps = torch.finfo(dtype).eps
    for key, value in expected.items():
        off = np.abs(got[key] - value) > eps * np.abs(value).max()
        if kind == "dare_ties":
            # TIES elects the sign of t1/d + t2/d: where |t1| and |t2| are one ulp apart, PEFT's rounded t/d can
            # tie (or flip) the vote, and the entry takes the other adapter's value; exact in float64 here
            near_tie = np.abs(t1[key] + t2[key]) <= eps * np.maximum(np.abs(t1[key]), np.abs(t2[key]))
            off &= ~near_tie
        assert not off.any(), key
        assert np.array_equal(got[key] == 0, value == 0), key  # dropped by both masks in both


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_half_precision_adapters_combine_as_peft(dtype: torch.dtype, kind: str) -> None:
    assert_combination_equal(kind, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mask_is_drawn_in_the_tensor_dtype(dtype: torch.dtype) -> None:
    """The mask source equals PEFT's ``torch.bernoulli(torch.full_like(t, density))`` bit for bit, and differs
    from a float32 draw with the same seed (the dtype is honoured)."""
    t = torch.zeros(256, 256, dtype=dtype)
    torch.manual_seed(5)
    expected = torch.bernoulli(torch.full_like(t, DENSITY)).double().numpy()
    torch.manual_seed(5)
    got = keep_mask_on(t.device, t.dtype)((256, 256), DENSITY)
    torch.manual_seed(5)
    as_float32 = keep_mask_on(t.device, torch.float32)((256, 256), DENSITY)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, as_float32)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (PEFT draws on the CUDA generator)"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_cuda_adapters_combine_as_peft(dtype: torch.dtype, kind: str) -> None:
    assert_combination_equal(kind, dtype, device="cuda")
