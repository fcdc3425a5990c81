"""LoRA files both ways against the real HF PEFT on tiny Llama and GPT-2 models (float32 files).

Tolerances (tests/peft_parity.py): merged weights agree to relative error ≤ MERGE_TOL = 1e-6 (the files are
float32; the NumPy reference merges in float64, PEFT in float32); one layer's output ≤ OUTPUT_TOL = 1e-5.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import peftdecl
from tests import peft_parity as parity
from tests.conftest import rel_err
from tests.hf_models import merged_state, numpy_inputs, peft, peft_model, perturb, tiny_gpt2, tiny_llama

LLAMA_CASES = {
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"k_proj": 4},
        alpha_pattern={"model.layers.0.self_attn.q_proj": 32},
    ),
    "layers_to_transform": dict(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    "layers_pattern": dict(r=4, target_modules=["v_proj"], layers_to_transform=0, layers_pattern="layers"),
    "all_linear_exclude": dict(r=4, lora_alpha=4, target_modules="all-linear", exclude_modules=["down_proj"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "regex": dict(r=2, target_modules=r".*\.(q|v)_proj"),
    "lora_bias": dict(r=4, target_modules=["o_proj"], lora_bias=True),  # built with attention_bias=True
    "modules_to_save": dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


def base_for(case: str):
    return tiny_llama(attention_bias=True) if case == "lora_bias" else tiny_llama()


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_peft_saved_lora_loads_and_merges_like_peft(case: str, tmp_path) -> None:
    config = peft.LoraConfig(init_lora_weights=False, **LLAMA_CASES[case])
    wrapped, ours = parity.load_peft_saved(lambda: base_for(case), config, tmp_path)
    parity.assert_merged_equal(ours.merge_and_unload(), merged_state(wrapped))


@pytest.mark.peft
@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_peftdecl_saved_lora_loads_in_peft(case: str, tmp_path) -> None:
    spec = {"peft_type": "LORA", "init_lora_weights": False, **LLAMA_CASES[case]}
    ours, loaded = parity.save_for_peft(lambda: base_for(case), spec, tmp_path)
    reference = peft_model(
        base_for(case), peft.LoraConfig(**{**LLAMA_CASES[case], "init_lora_weights": False})
    )
    parity.assert_saved_like_peft(tmp_path, reference)
    parity.assert_merged_equal(ours.merge_and_unload(), merged_state(loaded))


@pytest.mark.peft
def test_gpt2_conv1d_both_ways(tmp_path) -> None:
    config = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    x = np.random.default_rng(0).normal(size=(3, 32))
    config = peft.LoraConfig(init_lora_weights=False, **config)
    model, loaded = parity.round_trip(tiny_gpt2, config, tmp_path, {"transformer.h.0.attn.c_attn": x})
    parity.assert_merged_equal(model.merge_and_unload(), merged_state(loaded))


@pytest.mark.peft
def test_two_adapters_in_one_folder(tmp_path) -> None:
    wrapped = peft_model(
        tiny_llama(), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    wrapped.add_adapter("other", peft.LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False))
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.load_adapter(state, tmp_path, **options)
    ours.load_adapter(tmp_path, "other")
    assert set(ours.adapters) == {"default", "other"}
    ours.set_adapter("other")
    wrapped.set_adapter("other")
    x, module = np.random.default_rng(1).normal(size=(2, 64)), "model.layers.0.self_attn.o_proj"
    expected = parity.peft_layer_output(wrapped, module, x)
    assert rel_err(ours(module, x), expected) <= parity.OUTPUT_TOL

    ours.save(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "other" / "adapter_config.json").read_text())["r"] == 4
    both = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "resaved")
    both.load_adapter(tmp_path / "resaved" / "other", adapter_name="other")
    both.set_adapter("other")
    # PEFT on PEFT, both float32: the adapter read back from our file, against the one PEFT saved
    assert rel_err(parity.peft_layer_output(both, module, x), expected) <= 1e-6


@pytest.mark.peft
def test_saved_config_matches_peft_fields(tmp_path) -> None:
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.attach(state, {"peft_type": "LORA", "target_modules": "all-linear"}, **options)
    ours.save(tmp_path / "ours")
    peft_model(tiny_llama(), peft.LoraConfig(target_modules="all-linear")).save_pretrained(
        tmp_path / "theirs"
    )
    mine, _ = parity.assert_config_like_peft(
        tmp_path / "ours", tmp_path / "theirs", ignore=("peft_version", "base_model_name_or_path")
    )
    assert list(mine) == sorted(mine)


@pytest.mark.peft
@pytest.mark.parametrize(
    ("spec", "config"),
    [
        ({"peft_type": "LORA"}, lambda: peft.LoraConfig()),
        ({"peft_type": "IA3"}, lambda: peft.IA3Config()),
    ],
    ids=["lora", "ia3"],
)
def test_null_module_lists_are_saved_as_the_defaults_peft_resolved(spec, config, tmp_path) -> None:
    state, options = numpy_inputs(tiny_llama())
    peftdecl.attach(state, spec, **options).save(tmp_path / "ours")
    peft_model(tiny_llama(), config()).save_pretrained(tmp_path / "theirs")
    lists = ("target_modules", "feedforward_modules") if spec["peft_type"] == "IA3" else ("target_modules",)
    mine, _ = parity.assert_config_like_peft(tmp_path / "ours", tmp_path / "theirs", as_sets=lists)
    assert all(mine[key] for key in lists)  # not null: the model type's defaults, as PEFT wrote them
