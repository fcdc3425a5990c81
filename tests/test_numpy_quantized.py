"""The NumPy reference over quantised state dicts (bitsandbytes 4-bit / 8-bit and MLX affine layouts).

Every kind over a quantised layer equals the same kind over a float state dict holding the dequantised weight,
bit for bit (float64, the same arithmetic on the same numbers). Merging re-quantises: the stored codes equal
bitsandbytes' / MLX's own quantisation of the merged float32 weight; ``merge_and_unload(dequantize=True)`` gives
the full-precision merged weight. Against PEFT over bitsandbytes layers of a tiny Llama (LoRA, DoRA), each
adapted layer's output is within the gap measured between a bitsandbytes layer and a float64 matmul on its
dequantised weight.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from peftdecl.quant.layouts import dequantize, quantize, quantized_from_tensors, tensors_from_quantized
from peftdecl.quant.requantize import RequantizationWarning
from peftdecl.quant.scheme import QuantScheme
from peftdecl.train.tiny_model import build_tiny_llama
from tests.conftest import rel_err, selected_backends
from tests.layer_cases import KINDS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMES = {
    "nf4-double": QuantScheme("nf4", double_quant=True),
    "fp4": QuantScheme("fp4"),
    "int8": QuantScheme("int8"),
    "affine4": QuantScheme("affine", bits=4, group_size=32),
}
MLX_FACT = {"quantization": {"bits": 4, "group_size": 32}}  # mlx-lm's config.json entry
LAYER_KINDS = ["lora", "dora", "adalora", "ia3", "vera", "oft", "boft", "loha", "lokr"]
SHAPES = {"m": (32, 64), "n": (16, 64)}  # (out, in); VeRA targets both


def quantised_and_float(
    scheme: QuantScheme, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two linear layers with biases as the library stores them quantised, and the same layers as float32
    state-dict tensors holding the dequantised weights."""
    rng = np.random.default_rng(seed)
    packed: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    for module, shape in SHAPES.items():
        q = quantize(rng.normal(scale=0.1, size=shape), scheme)
        bias = rng.normal(scale=0.1, size=shape[0]).astype(np.float32)
        packed |= {**tensors_from_quantized(module, q), f"{module}.bias": bias}
        dense |= {f"{module}.weight": dequantize(q).astype(np.float32), f"{module}.bias": bias}
    return packed, dense


def attach_both(
    kind: str, quant: str, spec_fields: dict[str, Any] | None = None
) -> tuple[Any, Any, np.ndarray]:
    """``kind`` (its one-layer test spec) attached to the quantised and to the float state dict alike."""
    packed, dense = quantised_and_float(SCHEMES[quant])
    entry = KINDS[kind]
    spec = {**entry.spec, **(entry.layer_fields or {}).get("linear", {}), **(spec_fields or {})}
    if kind == "ia3":
        spec["feedforward_modules"] = ["m"]  # scales the input, so the base layer's own matmul runs on it
    facts = MLX_FACT if quant.startswith("affine") else {}
    models = []
    for state in (packed, dense):
        model = peftdecl.attach(state, spec, seed=3, **facts)
        if entry.prepare is not None:
            entry.prepare(model, spec, np.random.default_rng(5))
        models.append(model)
    x = np.random.default_rng(9).normal(size=(3, 64))
    return models[0], models[1], x


@pytest.mark.parametrize("quant", sorted(SCHEMES))
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_every_kind_over_a_quantised_layer_is_the_same_math(kind: str, quant: str) -> None:
    ours, dense, x = attach_both(kind, quant)
    info = ours.engine._info.layers["m"]
    assert info.quantization == SCHEMES[quant].name and info.quant_scheme == SCHEMES[quant]
    assert (info.in_features, info.out_features) == (64, 32)
    # exact: the float model holds the very numbers the quantised one dequantises to
    assert np.array_equal(ours.engine.base_weight("m"), dense.engine.base_weight("m"))
    assert np.array_equal(ours("m", x), dense("m", x))
    ours.train()
    dense.train()
    grads = []
    for model in (ours, dense):
        y, tape = model.engine.layer_forward("m", x)
        grads.append(model.engine.layer_backward("m", tape, np.cos(y)))
    assert grads[0].keys() == grads[1].keys()
    for key in grads[1]:
        assert np.array_equal(grads[0][key], grads[1][key]), key
    ours.eval()
    dense.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizationWarning)  # kept in full precision: nothing rounded
        unloaded = ours.merge_and_unload(dequantize=True)
    merged = dense.merge_and_unload()
    assert unloaded.keys() == merged.keys()  # the quantised tensors gave way to a float weight
    for key in merged:
        assert unloaded[key].dtype == merged[key].dtype == np.float64
        assert np.array_equal(unloaded[key], merged[key]), key


def _bnb() -> tuple[Any, Any]:
    if "torch" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves torch out, or torch is not installed")
    return pytest.importorskip("torch"), pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("quant", ["nf4-double", "fp4", "int8"])
def test_merge_requantises_like_bitsandbytes(quant: str) -> None:
    torch, bnb = _bnb()
    ours, dense, x = attach_both("lora", quant)
    original = {k: v.copy() for k, v in ours.engine.unload().items()}
    with pytest.warns(RequantizationWarning):
        ours.merge()
    dense.merge()
    merged32 = torch.from_numpy(dense.engine.base_weight("m").astype(np.float32))
    stored = ours.engine.unload()
    scheme = SCHEMES[quant]
    if quant == "int8":  # as PEFT's int8 merge stores it: a new Int8Params (quantised from float16)
        param = bnb.nn.Int8Params(merged32, requires_grad=False, has_fp16_weights=False).to("cpu")
        theirs = {"m.weight": param.data.numpy(), "m.SCB": param.SCB.numpy()}
    else:
        packed, state = bnb.functional.quantize_4bit(
            merged32, blocksize=64, quant_type=scheme.kind, compress_statistics=scheme.double_quant
        )
        theirs = {f"m.weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}
        theirs["m.weight"] = packed.numpy()
    for key, value in theirs.items():
        assert stored[key].dtype == value.dtype and stored[key].tobytes() == value.tobytes(), key
    # the merged model computes with the re-quantised weight, as PEFT's merged bitsandbytes layer does
    requantised = dequantize(quantized_from_tensors(stored, "m", scheme.name)).astype(np.float64)
    assert np.array_equal(ours("m", x), x @ requantised.T + stored["m.bias"])
    ours.unmerge()  # the loaded codes come back exactly
    for key, value in ours.engine.unload().items():
        assert value.tobytes() == original[key].tobytes(), key


def test_affine_merge_requantises_like_mlx() -> None:
    if "mlx" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves mlx out, or MLX is not installed")
    mx = pytest.importorskip("mlx.core")
    ours, dense, _ = attach_both("dora", "affine4")
    with pytest.warns(RequantizationWarning):
        ours.merge()
    dense.merge()
    merged32 = mx.array(dense.engine.base_weight("m").astype(np.float32))
    words, scales, biases = mx.quantize(merged32, group_size=32, bits=4)
    stored = ours.engine.unload()
    for key, value in {"m.weight": words, "m.scales": scales, "m.biases": biases}.items():
        assert np.array_equal(stored[key], np.array(value)), key


def test_a_malformed_or_underdescribed_checkpoint_is_refused_by_key() -> None:
    packed, _ = quantised_and_float(SCHEMES["affine4"])
    with pytest.raises(
        PeftdeclError, match=r"^m\.weight: an MLX affine-quantised weight; pass the model fact"
    ):
        peftdecl.attach(packed, KINDS["lora"].spec)
    packed, _ = quantised_and_float(SCHEMES["nf4-double"])
    del packed["n.weight.nested_absmax"]
    with pytest.raises(PeftdeclError, match=r"^n\.weight\.nested_absmax: missing"):
        peftdecl.attach(packed, KINDS["lora"].spec)


def test_per_module_mlx_settings_and_parameter_counts() -> None:
    """mlx-lm's config may give one module its own bits/group size; a quantised weight counts its elements once."""
    rng = np.random.default_rng(0)
    m = quantize(rng.normal(size=(32, 64)), SCHEMES["affine4"])
    n = quantize(rng.normal(size=(16, 64)), QuantScheme("affine", bits=8, group_size=64))
    state = {**tensors_from_quantized("m", m), **tensors_from_quantized("n", n)}
    facts = {"quantization": {"bits": 4, "group_size": 32, "n": {"bits": 8, "group_size": 64}}}
    model = peftdecl.attach(state, {**KINDS["lora"].spec, "target_modules": ["m", "n"]}, **facts)
    assert model.engine._info.layers["n"].quant_scheme == n.scheme
    assert np.array_equal(model.engine.base_weight("n"), dequantize(n))
    trainable, total = model.engine.parameter_counts()
    assert total - trainable == 32 * 64 + 16 * 64


# -- against PEFT over bitsandbytes layers -------------------------------------------------------------------
BNB = {
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}
# a bitsandbytes layer's output against a float64 matmul on its own dequantised weight, as measured here on q_proj
# and down_proj: 4-bit 1.3e-7 – 1.9e-7 (float32 rounding of the CPU kernel), int8 6.2e-3 – 6.6e-3 (LLM.int8
# quantises the activations as well); with the adapter added 1.0e-7 – 1.5e-7 and 1.2e-3 – 1.7e-3
GAP = {"nf4-double": 1e-6, "fp4": 1e-6, "int8": 2e-2}
MERGE_TOL = (
    1e-6  # merged 4-bit weights: PEFT sums in float32, we in float64; the absmax differ in the last bit
)
PEFT_CASES = [
    ("lora", "nf4-double"),
    ("lora", "fp4"),
    ("lora", "int8"),
    ("dora", "nf4-double"),
    ("dora", "fp4"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=1, intermediate=128)


def _quantised_llama(folder: Path, quant: str) -> Any:
    torch, bnb = _bnb()
    transformers = pytest.importorskip("transformers")
    config = transformers.BitsAndBytesConfig(**BNB[quant], bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    for module in model.modules():  # keep the stored 4-bit layout (no in-place repacking on AVX512-BF16 CPUs)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize(("kind", "quant"), PEFT_CASES)
def test_layers_like_peft_over_bitsandbytes(folder: Path, tmp_path: Path, kind: str, quant: str) -> None:
    torch, bnb = _bnb()
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    base = _quantised_llama(folder, quant)
    base.save_pretrained(tmp_path / "base")
    state = {k: v.numpy() for k, v in load_file(tmp_path / "base" / "model.safetensors").items()}
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_dora=kind == "dora"
    )
    wrapped = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    wrapped.save_pretrained(tmp_path / "adapter")
    ours = peftdecl.load_adapter(state, tmp_path / "adapter")
    rng = np.random.default_rng(11)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        layer = wrapped.base_model.model.get_submodule(module)
        x = rng.normal(size=(2, 5, layer.in_features)).astype(np.float32)
        with torch.no_grad():
            theirs = layer(torch.from_numpy(x)).double().numpy()
            base_out = layer.base_layer(torch.from_numpy(x)).double().numpy()
        dequantised = ours.engine.base_weight(module)
        # the measured gap: bitsandbytes' base layer against float64 on its dequantised weight
        assert rel_err(x.astype(np.float64) @ dequantised.T, base_out) <= GAP[quant]
        assert rel_err(ours(module, x), theirs) <= GAP[quant], module
    # merging re-quantises as PEFT does: the same codes (0 of 6144 differ, measured), the scales to rounding
    name = "bnb_8bit" if quant == "int8" else "bnb_4bit"
    with pytest.warns(RequantizationWarning):
        mine = ours.merge_and_unload()
    merged = wrapped.merge_and_unload()
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        layer, q = merged.get_submodule(module), quantized_from_tensors(mine, module, name)
        assert np.array_equal(q.codes, layer.weight.data.numpy()), module
        if quant == "int8":
            assert np.array_equal(q.scales, layer.weight.SCB.numpy())
        else:
            theirs_w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy()
            assert rel_err(dequantize(q), theirs_w) <= MERGE_TOL, module


def test_measured_gaps_are_recorded(folder: Path) -> None:
    """The tolerance above is what the layers really show: 4-bit far below int8 (a test that the int8 bound is
    not hiding a 4-bit mistake)."""
    torch, bnb = _bnb()
    gaps = {}
    for quant in ("nf4-double", "int8"):
        model = _quantised_llama(folder, quant)
        layer = model.get_submodule("model.layers.0.self_attn.q_proj")
        x = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
        if quant == "int8":
            scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
            w = bnb.functional.int8_vectorwise_dequant(layer.weight.data, scb).numpy()
        else:
            w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy()
        with torch.no_grad():
            out = layer(torch.from_numpy(x)).double().numpy()
        gaps[quant] = rel_err(x.astype(np.float64) @ w.astype(np.float64).T, out)
    assert gaps["nf4-double"] <= 1e-6 < 1e-3 <= gaps["int8"] <= GAP["int8"], json.dumps(gaps)
