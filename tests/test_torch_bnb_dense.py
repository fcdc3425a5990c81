"""Kinds that read or map the base weight (DoRA, OFT, BOFT, LoHa, LoKr) over bitsandbytes 4-bit and 8-bit layers on
torch, and every kind with bfloat16 compute, against HF PEFT on the same quantised tiny Llama.

DoRA's norm reads the weight dequantised per call (as PEFT does); OFT and BOFT rotate the input and run the
quantised layer's own kernel; LoHa and LoKr add x ΔWᵀ beside it. Where PEFT 0.21.2 cannot run a kind over a layer
(LoHa/LoKr crash on 4-bit layers, DoRA breaks an int8 layer) the test says so as a skip and ours is compared with
PEFT over the same model dequantised by transformers (``model.dequantize()``): the 4-bit CPU kernel differs from
a float matmul of its dequantised weight by ~1e-6 relative, inside the float32 bound. LLM.int8 layers differ from
their dequantised matmul by ~5e-3 over the whole model (activations are quantised too), so DoRA over int8 is checked
layer by layer against its formula written out here with the layer's own output and autograd.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err
from tests.peft_parity import assert_training_step_like_peft
from tests.test_torch_bnb import (
    KINDS,
    TOL,
    bnb,
    folder,  # noqa: F401  (the module-scoped fixture)
    peft_saved,
    peft_trainable,
    quantized,
    token_ids,
    torch,
)

BF16_TOL = 2e-2  # bnb_4bit_compute_dtype=bfloat16: both sides round the base product to bfloat16
PEFT_KINDS = ["dora", "oft", "boft"]
PEFT_FAILS = {
    ("dora", "int8"): "PEFT 0.21.2's DoRA breaks an int8 layer (AttributeError in its first forward)",
    ("loha", "nf4-double"): "PEFT 0.21.2's LoHa crashes on 4-bit layers (reads the packed weight's shape)",
    ("lokr", "nf4-double"): "PEFT 0.21.2's LoKr crashes on 4-bit layers (reads the packed weight's shape)",
}


def eval_logits(wrapped: Any, ours: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """(input ids, our logits, PEFT's logits) in eval mode, as float32 NumPy."""
    x = token_ids(wrapped)
    wrapped.eval()
    ours.eval()
    with torch.no_grad():
        expected = wrapped(input_ids=x).logits.float()
        got = ours(input_ids=x).logits.float()
    return x, got.numpy(), expected.numpy()


def assert_like(wrapped: Any, ours: Any, tol: float) -> None:
    """Eval logits, then loss, adapter gradients and one SGD step, each ≤ ``tol`` relative to PEFT's."""
    x, got, expected = eval_logits(wrapped, ours)
    assert rel_err(got, expected) <= tol
    # PEFT's AdaLoRA over a bfloat16-compute 4-bit layer leaves its constant ``ranknum`` trainable; not an adapter
    # tensor (ours keeps it frozen), so it is left out of the comparison and of the step
    theirs = {k: v for k, v in peft_trainable(wrapped).items() if not k.endswith(".ranknum")}
    assert_training_step_like_peft(wrapped, ours, theirs, tol, input_ids=x, labels=x)


@pytest.mark.parametrize(
    ("kind", "quant"),
    [(k, q) for k in PEFT_KINDS for q in ("nf4-double", "fp4", "int8")] + [("dora", "nf4")],
)
def test_dense_kinds_equal_peft_over_the_quantised_layer(
    folder: Path,  # noqa: F811
    tmp_path: Path,
    quant: str,
    kind: str,
) -> None:
    if (kind, quant) in PEFT_FAILS:
        pytest.skip(PEFT_FAILS[kind, quant] + "; test_dora_over_int8_follows_its_formula checks ours")
    wrapped = peft_saved(kind, quantized(folder, quant), tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, quant), tmp_path, is_trainable=True)
    layer = ours.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert_like(wrapped, ours, TOL)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_lokr_equal_peft_over_int8(folder: Path, tmp_path: Path, kind: str) -> None:  # noqa: F811
    wrapped = peft_saved(kind, quantized(folder, "int8"), tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, "int8"), tmp_path, is_trainable=True)
    assert_like(wrapped, ours, TOL)


@pytest.mark.parametrize(("kind", "quant"), [("loha", "nf4-double"), ("lokr", "nf4-double")])
def test_ours_over_layers_peft_cannot_run(folder: Path, tmp_path: Path, kind: str, quant: str) -> None:  # noqa: F811
    """Ours over the quantised model against PEFT over the same model dequantised (a float nn.Linear holding each
    layer's dequantised weight): ≤ 1e-5, the quantised kernel's own rounding included."""
    wrapped = peft_saved(kind, quantized(folder, quant).dequantize(), tmp_path)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in wrapped.modules())
    ours = peftdecl.load_adapter(quantized(folder, quant), tmp_path, is_trainable=True)
    assert_like(wrapped, ours, TOL)


def test_dora_over_int8_follows_its_formula(folder: Path) -> None:  # noqa: F811
    """y = g ⊙ (base(h) + s·B A h), g = m / ‖W + s·B A‖ per row (detached), W = CB · SCB / 127 read with
    bitsandbytes' own dequantiser, base(h) the int8 layer's own output; forward and gradients ≤ 1e-5 (float32)."""
    spec = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "use_dora": True,
        "target_modules": ["q_proj"],
        "init_lora_weights": False,
    }
    ours = peftdecl.attach(quantized(folder, "int8"), spec, seed=3)
    ours.train()
    layer = ours.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    base = layer.base_layer
    assert isinstance(base, bnb.nn.Linear8bitLt)
    params = ours.trainable_parameters()
    prefix = "model.layers.0.self_attn.q_proj."
    a, b, m = (params[prefix + k] for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 7, 64, generator=gen)
    probe = torch.randn(2, 7, 64, generator=gen)
    y = layer(h)
    (y * probe).sum().backward()
    scb = base.weight.SCB if base.weight.SCB is not None else base.state.SCB
    weight = bnb.functional.int8_vectorwise_dequant(base.weight.data, scb)
    a2, b2, m2 = (t.detach().clone().requires_grad_(True) for t in (a, b, m))
    with torch.no_grad():
        base_out = base(h)
        norm = torch.linalg.norm(weight + 2.0 * b2 @ a2, dim=1)
    expected = (m2 / norm) * (base_out + 2.0 * (h @ a2.t()) @ b2.t())
    (expected * probe).sum().backward()
    assert rel_err(y.detach().numpy(), expected.detach().numpy()) <= TOL
    for ours_param, theirs in ((a, a2), (b, b2), (m, m2)):
        assert rel_err(ours_param.grad.numpy(), theirs.grad.numpy()) <= TOL


@pytest.mark.parametrize("kind", sorted({*KINDS, *PEFT_KINDS}))
def test_bfloat16_compute_equals_peft(folder: Path, tmp_path: Path, kind: str) -> None:  # noqa: F811
    """bnb_4bit_compute_dtype=bfloat16 on a float32 model: ≤ 2e-2 (bfloat16 rounding of the base product, which
    both sides take from the same kernel, and of what the adapters add to it)."""
    wrapped = peft_saved(kind, quantized(folder, "nf4-double", torch.bfloat16), tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, "nf4-double", torch.bfloat16), tmp_path, is_trainable=True)
    assert_like(wrapped, ours, BF16_TOL)


def bfloat16_storage_model(folder: Path) -> Any:  # noqa: F811
    """A bfloat16 model whose 4-bit codes are stored in a bfloat16 tensor (``bnb_4bit_quant_storage``, as FSDP
    wants): its weight has the input's dtype, yet it holds codes."""
    return quantized(
        folder, "nf4", torch.bfloat16, dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16
    )


@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_codes_stored_as_bfloat16_are_never_read_as_a_weight(folder: Path, tmp_path: Path, kind: str) -> None:  # noqa: F811
    """A bfloat16 input meets a bfloat16 tensor of codes: no fused path may take it for the weight. Logits equal
    PEFT's ≤ 2e-2 (a bfloat16 model)."""
    wrapped = peft_saved(kind, bfloat16_storage_model(folder), tmp_path)
    ours = peftdecl.load_adapter(bfloat16_storage_model(folder), tmp_path)
    assert (
        ours.base_model.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight.dtype
        == torch.bfloat16
    )
    _, got, expected = eval_logits(wrapped, ours)
    assert rel_err(got, expected) <= BF16_TOL


def _absmax(state: Any) -> Any:
    """The float block scales of a 4-bit quant state (double quantisation undone with bitsandbytes' own code)."""
    if state.nested:
        return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False])
def test_repacked_4bit_weight_reads_as_the_layer_computes(quant_type: str, double: bool) -> None:
    """After an eval-mode forward repacks the weight in place, the weight we read is the codes times the block
    scales rounded to bfloat16, exactly (what the repacked kernel multiplies), not the bytes misread."""
    from peftdecl_torch.quantized import dequantized_weight

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        128, 64, compute_dtype=torch.float32, compress_statistics=double, quant_type=quant_type
    )
    layer.load_state_dict(torch.nn.Linear(128, 64).state_dict())
    layer = layer.to("cpu").eval()
    state = layer.weight.quant_state
    codes = layer.weight.data.clone()
    scales = _absmax(state).to(torch.bfloat16).float()
    flat = codes.reshape(-1)  # two codes a byte, the high nibble first
    index = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    expected = (state.code[index].reshape(-1, 64) * scales.reshape(-1, 1)).reshape(64, 128)
    layer.support_avx512bf16_for_cpu = True
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    got = dequantized_weight(layer)
    assert torch.equal(got, expected)
    # the repacked kernel computes in bfloat16: its output is x Wᵀ + b within bfloat16 rounding
    assert rel_err(y.numpy(), (x @ got.t() + layer.bias).detach().numpy()) <= BF16_TOL


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)
def test_dora_over_a_repacked_model_keeps_its_outputs(folder: Path, tmp_path: Path) -> None:  # noqa: F811
    """DoRA's norm over weights that repack on the first eval forward: the second forward (repacked) equals the
    first within bfloat16 rounding (≤ 2e-2; PEFT's misread drifts by ~3e-2 there)."""
    peft_saved("dora", quantized(folder, "nf4-double"), tmp_path)
    base = quantized(folder, "nf4-double")
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    ours = peftdecl.load_adapter(base, tmp_path)
    ours.eval()
    x = token_ids(base)
    with torch.no_grad():
        first = ours(input_ids=x).logits
        layer = ours.base_model.get_submodule("model.layers.0.self_attn.q_proj").base_layer
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        second = ours(input_ids=x).logits
    assert rel_err(second.numpy(), first.numpy()) <= BF16_TOL
