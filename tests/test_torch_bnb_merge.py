"""Merging adapters into bitsandbytes 4-bit and 8-bit layers on torch, and unloading them dequantised.

A merge dequantises the layer's codes, adds the adapter's change and quantises the sum again with the layer's own
scheme; HF PEFT 0.21.2 does the same for LoRA, DoRA, OFT, BOFT and VeRA, and on the same model both give the same
codes (compared exactly) and so the same merged logits. PEFT cannot merge IA3 or AdaLoRA into bnb layers
(NotImplementedError) nor LoHa/LoKr (crash): there the expected codes are bitsandbytes' own quantisation of PEFT's
merge over the model dequantised by transformers. ``merge_and_unload(dequantize=True)`` leaves no bnb layer.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

import peftdecl
from peftdecl.quant.requantize import RequantizationWarning
from tests.conftest import rel_err
from tests.test_torch_bnb import (
    QV,
    TOL,
    bnb,
    folder,  # noqa: F401  (the module-scoped fixture)
    peft_saved,
    quantized,
    token_ids,
    torch,
)

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
BNB = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def codes(layer: Any) -> Any:
    """The stored codes and, for a 4-bit layer, the float block scales bitsandbytes reads them with."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return weight.data, bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scb = weight.SCB if weight.SCB is not None else layer.state.SCB
    return weight.data, scb


def assert_same_codes(ours: Any, theirs: Any) -> None:
    for got, expected in zip(codes(ours), codes(theirs), strict=True):
        assert torch.equal(got, expected)


def merged_logits(model: Any, x: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("quant", ["nf4-double", "int8"])
@pytest.mark.parametrize("kind", ["lora", "dora", "oft", "boft", "vera"])
def test_merge_and_unmerge_give_peft_codes(folder: Path, tmp_path: Path, kind: str, quant: str) -> None:  # noqa: F811
    """Same codes and block scales (exactly) and merged logits (≤ 1e-5; equal in practice) as PEFT's merge, one
    warning per merge; unmerging re-quantises W' − ΔW as PEFT does."""
    wrapped = peft_saved(kind, quantized(folder, quant), tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, quant), tmp_path)
    wrapped.eval()
    ours.eval()
    x = token_ids(wrapped)
    unmerged = merged_logits(ours, x)
    wrapped.merge_adapter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.merge()
    assert [type(w.message) for w in caught] == [RequantizationWarning]
    assert f"{Q} and 1 more layer" in str(caught[0].message)
    for module in (Q, V):
        theirs_layer = wrapped.base_model.model.get_submodule(module).base_layer
        assert_same_codes(ours.base_model.get_submodule(module).base_layer, theirs_layer)
    got = merged_logits(ours, x)
    assert rel_err(got.numpy(), merged_logits(wrapped, x).numpy()) <= TOL
    assert rel_err(got.numpy(), unmerged.numpy()) > 0  # the merge did re-quantise (not a no-op)
    wrapped.unmerge_adapter()
    ours.unmerge()
    # W' − ΔW (DoRA: W'/g − ΔW; OFT: W' R⁻ᵀ where PEFT uses Rᵀ) is computed differently on the two sides, so
    # a block maximum can differ in its last bit and, rarely, a code flips one step (measured: 4-bit none, with
    # scales within 3e-7; int8 BOFT 2 of 4096): ≤ 0.1 % of the codes, and the logits ≤ 1e-5
    for module in (Q, V):
        got = ours.base_model.get_submodule(module).base_layer.weight.data
        expected = wrapped.base_model.model.get_submodule(module).base_layer.weight.data
        assert (got != expected).float().mean() <= 1e-3, module
    assert rel_err(merged_logits(ours, x).numpy(), merged_logits(wrapped, x).numpy()) <= TOL


def quantize_like(layer: Any, weight: Any) -> Any:
    """bitsandbytes' own quantisation of ``weight`` with ``layer``'s scheme: (codes, float block scales) for
    4-bit, (codes, row scales) for int8."""
    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        packed, new_state = bnb.functional.quantize_4bit(
            weight.contiguous(),
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
        )
        return packed, bnb.functional.dequantize_4bit(packed, new_state)
    # Int8Params (what transformers and PEFT build) rounds the weight to float16 before quantising it
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return cb, scb


MERGE_ELSEWHERE = {
    "ia3": ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"],
    "adalora": [Q, V],
    "loha": [Q, V],
    "lokr": [Q, V],
}


@pytest.mark.parametrize(
    ("kind", "quant"), [(k, "nf4-double") for k in sorted(MERGE_ELSEWHERE)] + [("ia3", "int8")]
)
def test_merges_peft_cannot_do_quantise_peft_float_merge(
    folder: Path,  # noqa: F811
    tmp_path: Path,
    kind: str,
    quant: str,
) -> None:
    """Our codes equal bitsandbytes' quantisation of PEFT's float merge over the dequantised model: float32 W + ΔW
    computed in two ways may differ in the last bit and so, rarely, flip a code across a rounding boundary; the
    measured count is zero here and at most 0.1 % is allowed."""
    dequantized = quantized(folder, quant).dequantize()
    # transformers leaves the load flags set after dequantize(); PEFT's IA3 reads them and refuses to merge
    dequantized.is_loaded_in_4bit = dequantized.is_loaded_in_8bit = False
    wrapped = peft_saved(kind, dequantized, tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, quant), tmp_path)
    merged = wrapped.merge_and_unload()
    with pytest.warns(RequantizationWarning):
        ours.merge()
    for module in MERGE_ELSEWHERE[kind]:
        layer = ours.base_model.get_submodule(module).base_layer
        assert isinstance(layer, BNB)
        expected_codes, expected_scales = quantize_like(layer, merged.get_submodule(module).weight.detach())
        got_codes, got_scales = codes(layer)
        assert (got_codes != expected_codes.reshape(got_codes.shape)).float().mean() <= 1e-3, module
        assert rel_err(got_scales.numpy(), expected_scales.reshape(got_scales.shape).numpy()) <= TOL, module


@pytest.mark.parametrize("quant", ["nf4-double", "int8"])
def test_merge_and_unload_dequantized_leaves_float_linears(folder: Path, tmp_path: Path, quant: str) -> None:  # noqa: F811
    """Every bnb layer (adapted or not) becomes an nn.Linear holding its dequantised (merged) weight in float32;
    logits equal the merged quantised model's within the kernels' own rounding: ≤ 1e-5 for 4-bit (the CPU kernel
    differs from a float matmul by ~1e-6), ≤ 1e-2 for int8 (LLM.int8 quantises the activations too: ~5e-3 here)."""
    peft_saved("lora", quantized(folder, quant), tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, quant), tmp_path)
    ours.eval()
    x = token_ids(ours.base_model)
    with pytest.warns(RequantizationWarning):
        ours.merge()
    expected = merged_logits(ours, x)
    model = ours.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, BNB) for m in model.modules())
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and "layers" in n}
    assert len(linears) == 7 and all(m.weight.dtype == torch.float32 for m in linears.values())
    tol = TOL if quant != "int8" else 1e-2
    assert rel_err(merged_logits(model, x).numpy(), expected.numpy()) <= tol


def test_merge_and_unload_keeps_bnb_layers_when_not_dequantised(folder: Path, tmp_path: Path) -> None:  # noqa: F811
    peft_saved("lora", quantized(folder, "nf4-double"), tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, "nf4-double"), tmp_path)
    with pytest.warns(RequantizationWarning):
        model = ours.merge_and_unload()
    assert isinstance(model.get_submodule(Q), bnb.nn.Linear4bit)
    assert not any(hasattr(m, "base_layer") for m in model.modules())


def test_dequantized_linear_keeps_the_bias() -> None:
    """A bnb layer with a bias becomes an nn.Linear with the same bias and W = dequantised codes; outputs equal
    the 4-bit layer's within its kernel's rounding (≤ 1e-5)."""
    from peftdecl_torch.quantized import dequantized_linear

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(128, 64).state_dict())
    layer = layer.to("cpu").eval()
    layer.support_avx512bf16_for_cpu = False
    linear = dequantized_linear(layer)
    assert type(linear) is torch.nn.Linear and torch.equal(linear.bias, layer.bias)
    assert torch.equal(
        linear.weight, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    )
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(linear(x).numpy(), layer(x).numpy()) <= TOL


def test_two_merges_warn_once_each(folder: Path) -> None:  # noqa: F811
    spec = {"peft_type": "LORA", "r": 4, "target_modules": QV, "init_lora_weights": False}
    ours = peftdecl.attach(quantized(folder, "nf4-double"), spec, name="a", seed=1)
    ours.add_adapter("b", spec, seed=2)
    for name in ("a", "b"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours.merge([name])
        assert [type(w.message) for w in caught] == [RequantizationWarning]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_after_dequantize_base_keeps_full_precision(folder: Path, tmp_path: Path, kind: str) -> None:  # noqa: F811
    """``merge_and_unload(dequantize=True)`` (the engine's ``dequantize_base()`` first, then merge and unload): each
    merged weight equals PEFT's float merge over the model transformers dequantised (≤ 1e-6, float32 W + ΔW
    computed two ways), no re-quantisation warning, and the logits equal the unmerged adapter's over the 4-bit
    model (≤ 1e-5: the 4-bit CPU kernel's rounding)."""
    wrapped = peft_saved(kind, quantized(folder, "nf4-double").dequantize(), tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, "nf4-double"), tmp_path)
    ours.eval()
    x = token_ids(ours.base_model)
    adapted = merged_logits(ours, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizationWarning)
        model = ours.merge_and_unload(dequantize=True)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) >= 7
    assert not any(isinstance(m, BNB) for m in model.modules())
    expected = wrapped.merge_and_unload()
    for module in (Q, V):
        got = model.get_submodule(module).weight.detach()
        assert rel_err(got.numpy(), expected.get_submodule(module).weight.detach().numpy()) <= 1e-6, module
    assert rel_err(merged_logits(model, x).numpy(), adapted.numpy()) <= TOL


def test_base_weights_read_dequantised_and_written_as_codes(folder: Path) -> None:  # noqa: F811
    """``engine.base_weight`` of adapted and plain bnb layers is bitsandbytes' dequantisation (exactly, as float64);
    ``load_base_weights`` quantises what it is given with the layer's own scheme (bitsandbytes' codes, exactly)."""
    ours = peftdecl.attach(
        quantized(folder, "nf4-double"), {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    )
    k = "model.layers.0.self_attn.k_proj"
    for module, layer in (
        (Q, ours.base_model.get_submodule(Q).base_layer),
        (k, ours.base_model.get_submodule(k)),
    ):
        expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
        assert torch.equal(torch.from_numpy(ours.engine.base_weight(module)), expected)
    gen = torch.Generator().manual_seed(2)
    for module, rows in ((Q, 64), (k, 32)):
        new = torch.randn(rows, 64, generator=gen)
        ours.engine.load_base_weights({f"{module}.weight": new.numpy()})
        layer = ours.base_model.get_submodule(module)
        layer = getattr(layer, "base_layer", layer)
        for got, expected in zip(codes(layer), quantize_like(layer, new), strict=True):
            assert torch.equal(got, expected.reshape(got.shape)), module


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)
def test_merge_into_a_repacked_layer_reads_the_weight_it_computes_with(folder: Path) -> None:  # noqa: F811
    """After an eval forward repacked the 4-bit weight (block scales rounded to bfloat16), a LoRA merge adds
    s·B A to codes × bfloat16 scales (written out here from the stored bytes) and re-quantises that: bitsandbytes'
    codes of the same sum, ≤ 0.1 % flipped by float32 rounding of ΔW computed two ways (measured: none)."""
    base = quantized(folder, "nf4")
    layer = base.get_submodule(Q)
    layer.support_avx512bf16_for_cpu = True
    state = layer.weight.quant_state
    flat = layer.weight.data.reshape(-1)  # two codes a byte, the high nibble first
    index = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    scales = state.absmax.to(torch.bfloat16).float()
    weight = (state.code[index].reshape(-1, 64) * scales.reshape(-1, 1)).reshape(64, 64)
    spec = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "init_lora_weights": False,
    }
    ours = peftdecl.attach(base, spec, seed=4)
    ours.eval()
    with torch.no_grad():
        ours(input_ids=token_ids(base))
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    params = ours.trainable_parameters()
    delta = 2.0 * params[Q + ".lora_B.weight"].detach() @ params[Q + ".lora_A.weight"].detach()
    with pytest.warns(RequantizationWarning):
        ours.merge()
    expected, _ = quantize_like(layer, weight + delta)
    got = layer.weight.data
    assert (got != expected.reshape(got.shape)).float().mean() <= 1e-3
