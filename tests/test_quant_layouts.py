"""Quantised state-dict layouts (peftdecl.quant.layouts) against the libraries that write them: a tiny Llama saved
by transformers after ``BitsAndBytesConfig`` loading, and a tiny mlx-lm model quantised with ``nn.quantize`` and
saved. Every quantised module is read, dequantised and compared with the library's own dequantised weight bit for
bit; writing it back reproduces the saved tensors byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peftdecl.errors import PeftdeclError
from peftdecl.quant.layouts import dequantize, quantize, quantized_from_tensors, tensors_from_quantized
from peftdecl.quant.scheme import QuantScheme
from peftdecl.train.tiny_model import build_tiny_llama
from tests.conftest import selected_backends

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BNB = {
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=1, intermediate=128)


def _bnb() -> tuple[Any, Any, Any]:
    if "torch" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves torch out, or torch is not installed")
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    return torch, bnb, pytest.importorskip("transformers")


def _own(tensors: dict[str, np.ndarray], module: str) -> dict[str, np.ndarray]:
    """The tensors of ``module`` itself (not of its children)."""
    return {k: v for k, v in tensors.items() if k.startswith(module + ".") and k != f"{module}.bias"}


def _assert_same_bytes(ours: dict[str, np.ndarray], saved: dict[str, np.ndarray]) -> None:
    assert ours.keys() == saved.keys()
    for key, value in saved.items():
        mine = ours[key]
        assert (mine.dtype, mine.shape) == (value.dtype, value.shape), key
        assert mine.tobytes() == value.tobytes(), key


@pytest.mark.parametrize(
    ("quant", "dtype"),
    [*((quant, "float32") for quant in sorted(BNB)), ("nf4-double", "bfloat16"), ("int8", "bfloat16")],
)
def test_bitsandbytes_checkpoint_reads_and_writes_back(folder: Path, tmp_path: Path, quant: str, dtype: str):
    torch, bnb, transformers = _bnb()
    from safetensors.torch import load_file

    config = transformers.BitsAndBytesConfig(**BNB[quant], bnb_4bit_compute_dtype=getattr(torch, dtype))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=getattr(torch, dtype)
    )
    model.save_pretrained(tmp_path / "q")
    # the quantised layers' tensors (a bfloat16 model's float tensors have no NumPy dtype)
    saved = {
        k: v.numpy() for k, v in load_file(tmp_path / "q" / "model.safetensors").items() if "_proj." in k
    }
    name = "bnb_8bit" if quant == "int8" else "bnb_4bit"
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }
    assert len(layers) == 7  # q, k, v, o, gate, up, down of the one decoder layer
    for module, layer in layers.items():
        q = quantized_from_tensors(saved, module, name)
        ours = dequantize(q)
        if quant == "int8":
            state = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
            theirs = bnb.functional.int8_vectorwise_dequant(layer.weight.data, state)
        else:
            state = layer.weight.quant_state
            theirs = bnb.functional.dequantize_4bit(layer.weight.data, state)
            assert q.dtype == dtype and q.scheme.double_quant == quant.endswith("double")
        # bit-exact: bfloat16 values travel as float32 on our side, so compare both as float32
        assert ours.shape == tuple(theirs.shape)
        assert np.array_equal(ours.astype(np.float32), theirs.float().numpy()), module
        _assert_same_bytes(tensors_from_quantized(module, q), _own(saved, module))


def test_fresh_4bit_state_json_equals_bitsandbytes():
    """The JSON and tensors written for a freshly quantised weight equal bitsandbytes' ``as_dict(packed=True)``,
    nested offset digits included (an offset that is not a short decimal)."""
    torch, bnb, _ = _bnb()
    w = np.random.default_rng(3).normal(scale=0.02, size=(32, 192)).astype(np.float32)
    for kind in ("nf4", "fp4"):
        packed, state = bnb.functional.quantize_4bit(
            torch.from_numpy(w), blocksize=64, quant_type=kind, compress_statistics=True
        )
        theirs = {f"m.weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}
        theirs["m.weight"] = packed.numpy()
        ours = tensors_from_quantized("m", quantize(w, QuantScheme(kind, double_quant=True)))
        _assert_same_bytes(ours, theirs)


@pytest.fixture(scope="module")
def mx() -> Any:
    if "mlx" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves mlx out, or MLX is not installed")
    return pytest.importorskip("mlx.core")


@pytest.mark.parametrize(
    ("bits", "group_size", "dtype"), [(4, 64, "float32"), (8, 32, "float16"), (3, 32, "float32")]
)
def test_mlx_lm_checkpoint_reads_and_writes_back(mx, folder: Path, tmp_path: Path, bits, group_size, dtype):
    import mlx.nn as nn
    import mlx_lm
    from mlx.utils import tree_flatten

    model, _ = mlx_lm.load(str(folder))
    model.set_dtype(getattr(mx, dtype))
    nn.quantize(model, group_size=group_size, bits=bits)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    saved = {k: np.array(v) for k, v in mx.load(str(tmp_path / "model.safetensors")).items()}
    modules = [k.removesuffix(".scales") for k in saved if k.endswith(".scales")]
    assert len(modules) >= 8  # 7 linear layers and the embedding (lm_head too when it is not tied)
    for module in modules:
        q = quantized_from_tensors(saved, module, "mlx_affine", bits=bits, group_size=group_size)
        assert q.dtype == dtype
        w, scales, biases = (mx.array(saved[f"{module}.{k}"]) for k in ("weight", "scales", "biases"))
        theirs = np.array(mx.dequantize(w, scales, biases, group_size=group_size, bits=bits))
        ours = dequantize(q)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), module  # bit for bit
        _assert_same_bytes(tensors_from_quantized(module, q), _own(saved, module))


def _nf4_state() -> dict[str, np.ndarray]:
    q = quantize(np.random.default_rng(0).normal(size=(8, 64)), QuantScheme("nf4", double_quant=True))
    return tensors_from_quantized("layers.0.q", q)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("layers.0.q.weight.absmax", r"layers\.0\.q\.weight\.absmax: missing; expected absmax codes"),
        ("layers.0.q.weight.nested_absmax", r"layers\.0\.q\.weight\.nested_absmax: missing"),
        ("layers.0.q.weight.quant_map", r"layers\.0\.q\.weight\.quant_map: missing"),
        ("layers.0.q.weight", r"layers\.0\.q\.weight: missing; expected packed 4-bit codes"),
        ("layers.0.q.weight.quant_state.bitsandbytes__nf4", r"bitsandbytes__nf4 \(or .*__fp4\): expected exactly"),
    ],
)  # fmt: skip
def test_missing_4bit_key_is_named(drop: str, message: str) -> None:
    state = _nf4_state()
    del state[drop]
    with pytest.raises(PeftdeclError, match=message):
        quantized_from_tensors(state, "layers.0.q", "bnb_4bit")


def test_malformed_tensors_are_named() -> None:
    state = _nf4_state()
    key = "layers.0.q.weight.quant_state.bitsandbytes__nf4"
    bad_json = {**state, key: np.frombuffer(b"{not json", np.uint8)}
    with pytest.raises(PeftdeclError, match=rf"{key}: does not hold bitsandbytes' quant-state JSON"):
        quantized_from_tensors(bad_json, "layers.0.q", "bnb_4bit")
    no_shape = json.loads(state[key].tobytes())
    del no_shape["shape"]
    with pytest.raises(PeftdeclError, match=rf"{key}: the quant-state JSON needs 'shape'"):
        quantized_from_tensors(
            {**state, key: np.frombuffer(json.dumps(no_shape).encode(), np.uint8)}, "layers.0.q", "bnb_4bit"
        )
    wrong = {**state, "layers.0.q.weight.absmax": state["layers.0.q.weight.absmax"].astype(np.float32)}
    with pytest.raises(PeftdeclError, match=r"weight\.absmax: expected absmax codes .* uint8 of shape \[8\]"):
        quantized_from_tensors(wrong, "layers.0.q", "bnb_4bit")
    int8 = {"m.weight": np.zeros((4, 8), np.int8)}
    with pytest.raises(PeftdeclError, match=r"^m\.SCB: missing; expected the absmax \(SCB\) per row"):
        quantized_from_tensors(int8, "m", "bnb_8bit")
    with pytest.raises(PeftdeclError, match=r"m\.weight_format: only the row-major"):
        quantized_from_tensors(
            {**int8, "m.SCB": np.ones(4, np.float32), "m.weight_format": np.array(1, np.uint8)},
            "m",
            "bnb_8bit",
        )
    affine = tensors_from_quantized("m", quantize(np.ones((4, 64)), QuantScheme("affine", group_size=32)))
    with pytest.raises(
        PeftdeclError, match=r"^m\.weight: an MLX affine-quantised weight needs bits and group_size"
    ):
        quantized_from_tensors(affine, "m", "mlx_affine")
    del affine["m.biases"]
    with pytest.raises(PeftdeclError, match=r"^m\.biases: missing"):
        quantized_from_tensors(affine, "m", "mlx_affine", bits=4, group_size=32)
    with pytest.raises(PeftdeclError, match=r"m: unknown quantisation 'gptq'"):
        quantized_from_tensors(affine, "m", "gptq")


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme("nf4"), QuantScheme("fp4", double_quant=True), QuantScheme("int8"),
     QuantScheme("affine", bits=4, group_size=32), QuantScheme("affine", bits=6, group_size=64)],
    ids=["nf4", "fp4-double", "int8", "affine4", "affine6"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_quantize_round_trips_through_the_layout(scheme: QuantScheme, dtype: str) -> None:
    """Quantised, written and read back, the weight is the same Quantized and dequantises alike; the
    dequantised weight is within the codec's step of the input (a coarse check that the dispatch is right)."""
    w = np.random.default_rng(1).normal(size=(6, 128))
    q = quantize(w, scheme, dtype=dtype)
    name = scheme.name
    back = quantized_from_tensors(
        tensors_from_quantized("m", q),
        "m",
        name,
        bits=scheme.bits,
        group_size=scheme.group_size,
        dtype=q.dtype,
    )
    assert back.scheme == q.scheme and back.shape == q.shape
    assert np.array_equal(dequantize(back), dequantize(q))
    # half the widest step: NF4/FP4 tables ≤ 0.34 · absmax, int8 SCB / 127, affine (max − min) / (2^bits − 1);
    # 2 % on top for rounding the input to float16/bfloat16
    top = np.abs(w).max()
    step = {"nf4": 0.34 * top, "fp4": 0.34 * top, "int8": top / 127}.get(
        scheme.kind, 2 * top / (2**scheme.bits - 1)
    )
    assert np.abs(dequantize(q).astype(np.float64) - w).max() <= 0.5 * step + 0.02 * top


@pytest.mark.parametrize("double", [False, True], ids=["nf4", "nf4-double"])
def test_checkpoint_saved_after_an_eval_forward_reads_like_bitsandbytes(folder: Path, tmp_path: Path, double):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight at its first eval forward and, saving it, writes it
    back in the stored layout with its block scales rounded (plain absmax as bfloat16 of shape (1, blocks)). Such a
    checkpoint reads as bitsandbytes itself reads it on reload (on other CPUs nothing is repacked: a plain case)."""
    torch, bnb, transformers = _bnb()
    from safetensors.torch import load_file

    config = transformers.BitsAndBytesConfig(
        **BNB["nf4-double" if double else "nf4"], bnb_4bit_compute_dtype=torch.float32
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    model.save_pretrained(tmp_path / "q")
    saved = {
        k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()  # NumPy has no bfloat16: exact in float32
        for k, v in load_file(tmp_path / "q" / "model.safetensors").items()
        if "_proj." in k
    }
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    for module, layer in reloaded.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            theirs = (
                bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().numpy()
            )
            assert np.array_equal(dequantize(quantized_from_tensors(saved, module, "bnb_4bit")), theirs), (
                module
            )
