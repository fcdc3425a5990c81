"""What a saved ``adapter_config.json`` records of the base model (issue 10, item 3): HF PEFT's
``base_model_name_or_path`` and ``task_type``, so that ``peft.AutoPeftModelFor*.from_pretrained(folder)`` rebuilds
the base model and the adapter on its own.

Expected values come from HF PEFT: its own ``save_pretrained`` on the same model and config (the JSON must be
equal), its task-type -> PeftModel class table, and the logits of the model AutoPeftModel builds (within 1e-5
relative, float32).
"""

from __future__ import annotations

import json

import pytest

import peftdecl
from peftdecl_torch.inventory import inventory
from tests.conftest import rel_err
from tests.hf_models import peft, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, torch, transformers

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


def test_config_equals_what_peft_writes(llama_folder, tmp_path) -> None:
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    assert base.name_or_path == str(llama_folder)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftdecl.attach(
        transformers.AutoModelForCausalLM.from_pretrained(llama_folder), {"peft_type": "LORA", **LORA}
    )
    ours.save(tmp_path / "ours")
    written = config_of(tmp_path / "ours")
    assert written["base_model_name_or_path"] == str(llama_folder) and written["task_type"] == "CAUSAL_LM"
    expected = config_of(tmp_path / "peft")
    assert set(written.pop("target_modules")) == set(expected.pop("target_modules"))  # PEFT's is a set
    assert written == expected  # auto_mapping null, peft_version as PEFT writes them


def test_auto_peft_model_loads_the_saved_adapter(llama_folder, tmp_path) -> None:
    ours = peftdecl.attach(
        transformers.AutoModelForCausalLM.from_pretrained(llama_folder), {"peft_type": "LORA", **LORA}
    )
    ours.save(tmp_path)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "PeftModelForCausalLM"
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


@pytest.mark.parametrize(
    ("build", "task", "peft_class"),
    [
        (lambda: tiny_llama(), "CAUSAL_LM", "PeftModelForCausalLM"),
        (lambda: tiny_gpt2(), "CAUSAL_LM", "PeftModelForCausalLM"),
        (lambda: tiny_t5(), "SEQ_2_SEQ_LM", "PeftModelForSeq2SeqLM"),
        (lambda: tiny_bert(), "SEQ_CLS", "PeftModelForSequenceClassification"),
        (lambda: tiny_bert(head="token"), "TOKEN_CLS", "PeftModelForTokenClassification"),
        (lambda: tiny_llama(head="qa"), "QUESTION_ANS", "PeftModelForQuestionAnswering"),
        (lambda: tiny_bert(head="none"), "FEATURE_EXTRACTION", "PeftModelForFeatureExtraction"),
    ],
    ids=["llama", "gpt2", "t5", "bert_seq_cls", "bert_token", "llama_qa", "bert_bare"],
)
def test_task_type_from_the_model_class(build, task: str, peft_class: str) -> None:
    assert inventory(build()).task_type == task
    assert peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task].__name__ == peft_class


def test_head_task_written_only_when_the_head_is_saved(tmp_path) -> None:
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["query", "value"], "init_lora_weights": False}
    peftdecl.attach(tiny_bert(), spec).save(tmp_path / "bare")
    # SEQ_CLS would make PEFT (and peftdecl) add the classifier to modules_to_save on loading: not written
    assert config_of(tmp_path / "bare")["task_type"] is None
    with_head = peftdecl.attach(tiny_bert(), {**spec, "modules_to_save": ["classifier"]})
    with_head.save(tmp_path / "head")
    assert config_of(tmp_path / "head")["task_type"] == "SEQ_CLS"
    theirs = peft.PeftModelForSequenceClassification.from_pretrained(tiny_bert(), tmp_path / "head")
    ids = IDS % 100
    with torch.no_grad():
        assert rel_err(with_head(input_ids=ids).logits.numpy(), theirs(input_ids=ids).logits.numpy()) <= TOL


def test_prompt_learning_gets_only_a_language_model_task(tmp_path) -> None:
    spec = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}
    peftdecl.attach(tiny_llama(), spec).save(tmp_path / "llama")
    assert config_of(tmp_path / "llama")["task_type"] == "CAUSAL_LM"
    peftdecl.attach(tiny_bert(), spec).save(tmp_path / "bert")
    assert config_of(tmp_path / "bert")["task_type"] is None  # SEQ_CLS would change how the prompt is fed


def test_mlx_model_records_its_task_and_no_path(tmp_path) -> None:
    pytest.importorskip("mlx.core")
    from tests.mlx_models import tiny_llama as mlx_llama

    peftdecl.attach(mlx_llama(), {"peft_type": "LORA", **LORA}).save(tmp_path)
    written = config_of(tmp_path)
    assert written["task_type"] == "CAUSAL_LM" and written["base_model_name_or_path"] is None
