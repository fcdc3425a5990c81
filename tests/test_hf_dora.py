"""DoRA files both ways against the real HF PEFT: tiny Llama (q/v, embeddings, rsLoRA), GPT-2 Conv1D and a
torch module with Conv1d/Conv2d layers.

Tolerances (tests/peft_parity.py): merged weights relative error ≤ MERGE_TOL = 1e-6 (float32 PEFT vs the float64
reference on float32 files); per-layer outputs and gradients ≤ OUTPUT_TOL = 1e-5 (PEFT's float32 layer called
on a float32 input).
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err
from tests.hf_models import Layers, peft, peft_model, tiny_gpt2, tiny_llama, torch
from tests.peft_parity import (
    OUTPUT_TOL,
    assert_computes_like_peft,
    assert_saved_like_peft,
    llama_with_bias,
    load_peft_saved,
    probe_inputs,
    save_for_peft,
)


def convs() -> Layers:
    """A plain torch module with the convolution types DoRA supports."""
    return Layers(
        lambda: {
            "c1": torch.nn.Conv1d(3, 4, 3, padding=1, stride=2),
            "c2": torch.nn.Conv2d(3, 5, 3, padding=1),
        }
    )


CASES = {
    "llama_qv": (llama_with_bias, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "llama_embedding": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama_rslora": (tiny_llama, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj"])),
    "gpt2_conv1d": (
        tiny_gpt2,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
    "convs": (convs, dict(r=2, lora_alpha=4, target_modules=["c1", "c2"])),
}
PROBES = {  # module -> input shape, or a builder (token ids); one per layer type in the cases
    "model.layers.0.self_attn.q_proj": (2, 3, 64),
    "model.layers.1.self_attn.v_proj": (2, 64),
    "model.layers.0.self_attn.o_proj": (3, 64),
    "model.embed_tokens": lambda rng: rng.integers(0, 128, size=(2, 5)),
    "transformer.h.0.attn.c_attn": (3, 32),
    "transformer.h.1.mlp.c_proj": (3, 128),
    "c1": (2, 3, 9),
    "c2": (2, 3, 6, 6),
}


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_dora_loads_with_peft_outputs_and_merge(case: str, tmp_path) -> None:
    make, config = CASES[case]
    # perturbing moves m away from ‖W + sBA‖, so g ≠ 1
    wrapped, ours = load_peft_saved(
        make, peft.LoraConfig(use_dora=True, init_lora_weights=False, **config), tmp_path
    )
    assert ours.plan().kind == "dora"
    assert_computes_like_peft(ours, wrapped, probe_inputs(ours, PROBES))


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(CASES))
def test_peftdecl_saved_dora_loads_in_peft(case: str, tmp_path) -> None:
    make, config = CASES[case]
    spec = {"peft_type": "LORA", "use_dora": True, "init_lora_weights": False, **config}
    ours, loaded = save_for_peft(make, spec, tmp_path)
    reference = peft_model(make(), peft.LoraConfig(use_dora=True, init_lora_weights=False, **config))
    assert_saved_like_peft(tmp_path, reference)
    assert_computes_like_peft(ours, loaded, probe_inputs(ours, PROBES))


@pytest.mark.peft
def test_training_forward_and_gradients_match_peft(tmp_path) -> None:
    """Dropout masks are shared by replacing PEFT's dropout with the mask the reference draws; PEFT then
    recomputes the base term on the dropped input, and its autograd (n detached) gives the gradients."""
    p_drop, module = 0.3, "model.layers.0.self_attn.q_proj"
    config = dict(r=4, lora_alpha=8, lora_dropout=p_drop, target_modules=["q_proj"])
    wrapped, ours = load_peft_saved(
        tiny_llama, peft.LoraConfig(use_dora=True, init_lora_weights=False, **config), tmp_path
    )

    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(2, 3, 64)), rng.normal(size=(2, 3, 64))
    mask = (np.random.default_rng(5).random(x.shape) >= p_drop) / (1 - p_drop)  # the reference's first draw
    layer = wrapped.base_model.model.get_submodule(module)

    class FixedDropout(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t * torch.tensor(mask, dtype=t.dtype)

    layer.lora_dropout["default"] = FixedDropout()
    layer.train()
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    out = layer(xt)
    (out * torch.tensor(dy, dtype=torch.float32)).sum().backward()

    ours.train()
    ours.engine.rng = np.random.default_rng(5)
    y, tape = ours.engine.layer_forward(module, x)
    assert rel_err(y, out.detach().double().numpy()) <= OUTPUT_TOL
    grads = ours.engine.layer_backward(module, tape, dy)
    theirs = {
        "lora_A.weight": layer.lora_A["default"].weight.grad,
        "lora_B.weight": layer.lora_B["default"].weight.grad,
        "lora_magnitude_vector": layer.lora_magnitude_vector["default"].weight.grad,
    }
    for name, grad in theirs.items():
        assert rel_err(grads[f"{module}.{name}"], grad.double().numpy()) <= OUTPUT_TOL, name
    assert rel_err(grads["input"], xt.grad.double().numpy()) <= OUTPUT_TOL


@pytest.mark.peft
def test_peft_dora_config_is_a_valid_spec(tmp_path) -> None:
    wrapped = peft_model(tiny_llama(), peft.LoraConfig(use_dora=True, target_modules=["q_proj"]))
    wrapped.save_pretrained(tmp_path)
    spec = peftdecl.load_spec(tmp_path / "adapter_config.json")
    assert spec.kind == "dora" and spec.use_dora
