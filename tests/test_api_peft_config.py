"""What a saved ``adapter_config.json`` records of the base model: HF PEFT's ``base_model_name_or_path``, so that
``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` rebuilds the base model and the adapter on its own. A
spec without a task type is saved as PEFT saves a config without one: ``task_type`` null and the model's class as
``auto_mapping``, which is what AutoPeftModel reads then.

Expected values come from HF PEFT: its own ``save_pretrained`` on the same model and config (the JSON must be
equal), and the logits of the model AutoPeftModel builds (within 1e-5 relative, float32).
"""

from __future__ import annotations

import json

import pytest

import peftdecl
from tests.conftest import rel_err
from tests.hf_models import peft, tiny_llama, torch, transformers

TOL = 1e-5
IDS = torch.tensor([[3, 17, 42, 9, 77, 5], [64, 1, 8, 99, 23, 50]])
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}


def config_of(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_config_equals_what_peft_writes(llama_folder, tmp_path, task_type) -> None:
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    assert base.name_or_path == str(llama_folder)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**LORA, task_type=task_type))
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftdecl.attach(
        transformers.AutoModelForCausalLM.from_pretrained(llama_folder),
        {"peft_type": "LORA", **LORA, "task_type": task_type},
    )
    ours.save(tmp_path / "ours")
    written = config_of(tmp_path / "ours")
    assert written["base_model_name_or_path"] == str(llama_folder) and written["task_type"] == task_type
    expected = config_of(tmp_path / "peft")
    assert set(written.pop("target_modules")) == set(expected.pop("target_modules"))  # PEFT's is a set
    assert written == expected  # auto_mapping and peft_version as PEFT writes them


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_auto_peft_model_loads_the_saved_adapter(llama_folder, tmp_path, task_type) -> None:
    ours = peftdecl.attach(
        transformers.AutoModelForCausalLM.from_pretrained(llama_folder),
        {"peft_type": "LORA", **LORA, "task_type": task_type},
    )
    ours.save(tmp_path)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    ours.eval()
    with torch.no_grad():
        assert rel_err(ours(input_ids=IDS).logits.numpy(), theirs(input_ids=IDS).logits.numpy()) <= TOL


def test_the_specs_own_values_are_kept(llama_folder, tmp_path) -> None:
    spec = {
        "peft_type": "LORA",
        **LORA,
        "base_model_name_or_path": "org/model",
        "task_type": "FEATURE_EXTRACTION",
    }
    peftdecl.attach(transformers.AutoModelForCausalLM.from_pretrained(llama_folder), spec).save(tmp_path)
    written = config_of(tmp_path)
    assert (written["base_model_name_or_path"], written["task_type"]) == ("org/model", "FEATURE_EXTRACTION")


def test_a_model_built_from_a_config_has_no_path_to_record(tmp_path) -> None:
    peftdecl.attach(tiny_llama(), {"peft_type": "LORA", **LORA}).save(tmp_path)
    assert config_of(tmp_path)["base_model_name_or_path"] is None  # PEFT writes null here too


def test_mlx_model_records_no_path(tmp_path) -> None:
    pytest.importorskip("mlx.core")
    from tests.mlx_models import tiny_llama as mlx_llama

    peftdecl.attach(mlx_llama(), {"peft_type": "LORA", **LORA}).save(tmp_path)
    written = config_of(tmp_path)
    assert written["task_type"] is None and written["base_model_name_or_path"] is None
