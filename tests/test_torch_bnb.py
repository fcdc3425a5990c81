"""Adapters over bitsandbytes 4-bit and 8-bit layers on the torch backend, against HF PEFT on the same model.

A tiny Llama folder is loaded twice with the same ``BitsAndBytesConfig`` (float32 compute); PEFT wraps one copy and
saves its adapter, peftdecl loads that folder onto the other. Both sides run the very same bitsandbytes layer for
the base, so logits, loss, adapter gradients and the parameters after one SGD step agree to ≤ 1e-5 relative
(float32 rounding of the adapter arithmetic only) for 4-bit and for 8-bit alike, although LLM.int8 quantises the
activations too. This module holds the helpers the other bnb modules share: ``test_torch_bnb_dense.py`` (kinds that
read the dequantised weight, bfloat16 compute) and ``test_torch_bnb_merge.py`` (merges, dequantised unload).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import peftdecl
from peftdecl.train.tiny_model import build_tiny_llama
from tests.conftest import rel_err, selected_backends
from tests.peft_parity import assert_training_step_like_peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
if "torch" not in selected_backends():
    pytest.skip("the torch backend is not selected", allow_module_level=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-5  # float32 compute: logits, loss, gradients, parameters after a step (4-bit and 8-bit)

QUANTS = {
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}
TESTED_QUANTS = ["nf4-double", "fp4", "int8"]  # plain nf4 runs in the dense and merge modules
QV = ["q_proj", "v_proj"]
KINDS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False),
    # a task type makes PEFT add AdaLoRA's orthogonality term to the loss (the parity helper adds ours)
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=QV, task_type="CAUSAL_LM"
    ),
    "ia3": lambda: peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=QV, init_weights=False),
}
DENSE_KINDS = {  # kinds that read the base weight (DoRA's norm) or map it (OFT, BOFT, LoHa, LoKr)
    "dora": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False, use_dora=True
    ),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=QV, init_weights=False),
    # one butterfly factor: PEFT without its CUDA extension builds one whatever the config says
    "boft": lambda: peft.BOFTConfig(
        boft_block_size=8, boft_n_butterfly_factor=1, target_modules=QV, init_weights=False
    ),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=QV, init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=4, target_modules=QV, init_weights=False),
}
ALL_KINDS = {**KINDS, **DENSE_KINDS}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=1, intermediate=128)


def quantized(folder: Path, quant: str, compute: Any = None, *, dtype: Any = None, **options: Any) -> Any:
    """The tiny Llama as transformers loads it with ``BitsAndBytesConfig`` (``compute``: bnb_4bit_compute_dtype,
    float32 by default; ``options``: more of its fields) in ``dtype`` (float32 by default), with the CPU's in-place
    repacking of 4-bit weights switched off so both sides keep the same stored weight."""
    config = transformers.BitsAndBytesConfig(
        **QUANTS[quant], bnb_4bit_compute_dtype=torch.float32 if compute is None else compute, **options
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=torch.float32 if dtype is None else dtype
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def peft_saved(kind: str, base: Any, out: Path) -> Any:
    """PEFT's ``kind`` on ``base`` with non-trivial adapter values, saved in ``out``."""
    torch.manual_seed(1234)
    wrapped = peft.get_peft_model(base, ALL_KINDS[kind]())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    wrapped.save_pretrained(out)
    return wrapped


def token_ids(model: Any, seed: int = 0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 7), generator=gen)


def peft_trainable(wrapped: Any) -> dict[str, Any]:
    """PEFT's trainable parameters under peftdecl's keys (model prefix and adapter name removed)."""
    return {
        n.removeprefix("base_model.model.")
        .replace(".default", "")
        .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p
        for n, p in wrapped.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("quant", TESTED_QUANTS)
def test_logits_loss_gradients_and_step_equal_peft(
    folder: Path, tmp_path: Path, quant: str, kind: str
) -> None:
    wrapped = peft_saved(kind, quantized(folder, quant), tmp_path)
    ours = peftdecl.load_adapter(quantized(folder, quant), tmp_path, is_trainable=True)
    layer = ours.base_model.get_submodule(
        "model.layers.0.self_attn.k_proj" if kind == "ia3" else "model.layers.0.self_attn.q_proj"
    )
    assert isinstance(layer.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    x = token_ids(wrapped)
    wrapped.eval()
    ours.eval()
    with torch.no_grad():
        expected = wrapped(input_ids=x).logits
        got = ours(input_ids=x).logits
    assert rel_err(got.numpy(), expected.numpy()) <= TOL
    assert_training_step_like_peft(wrapped, ours, peft_trainable(wrapped), TOL, input_ids=x, labels=x)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_saved_adapter_loads_in_peft_over_its_4bit_model(folder: Path, tmp_path: Path, kind: str) -> None:
    peft_saved(kind, quantized(folder, "nf4-double"), tmp_path / "peft")
    ours = peftdecl.load_adapter(quantized(folder, "nf4-double"), tmp_path / "peft", is_trainable=True)
    with torch.no_grad():  # move away from PEFT's values so that the file, not the seed, decides the result
        for param in ours.trainable_parameters().values():
            param.mul_(1.5)
    ours.save(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(quantized(folder, "nf4-double"), tmp_path / "ours")
    x = token_ids(theirs, seed=3)
    ours.eval()
    with torch.no_grad():
        assert rel_err(ours(input_ids=x).logits.numpy(), theirs(input_ids=x).logits.numpy()) <= TOL


def test_two_active_adapters_over_a_quantised_layer(folder: Path) -> None:
    """Two LoRAs active on one 4-bit layer add their changes to its bitsandbytes output (≤ 1e-5 relative, float32)."""
    spec = {"peft_type": "LORA", "r": 4, "target_modules": QV, "init_lora_weights": False}
    ours = peftdecl.attach(quantized(folder, "nf4-double"), spec, name="a", seed=1)
    ours.add_adapter("b", {**spec, "r": 2}, seed=2)
    ours.eval()
    layer = ours.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    h = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    outputs = {}
    with torch.no_grad():
        base = layer.base_layer(h)
        for active in ("a", "b", ("a", "b")):
            ours.set_adapter(active)
            outputs[active] = layer(h)
    for name in ("a", "b"):  # each adapter changes the output by far more than the tolerance
        assert rel_err(outputs[name].numpy(), base.numpy()) > 1e-2
    expected = outputs["a"] + outputs["b"] - base
    assert rel_err(outputs[("a", "b")].numpy(), expected.numpy()) <= TOL
