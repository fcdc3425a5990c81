"""BERT (encoder-only, tiny, built from a config) on the torch backend against the real HF PEFT, float32: logits,
loss, gradients and the parameters after one SGD step ≤ 1e-5 relative; targets, ``modules_to_save`` and the saved
file's keys and config exactly as PEFT has them (``task_type`` SEQ_CLS: the classifier head is excluded from
``all-linear`` and trained and saved in full).
"""

from __future__ import annotations

import json

import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from tests.conftest import rel_err
from tests.hf_models import numpy_inputs, peft, peft_model, perturb, tiny_bert, torch
from tests.peft_parity import (
    assert_config_like_peft,
    assert_loss_and_gradients_like_peft,
    assert_prompt_training_like_peft,
    assert_saved_like_peft,
)

pytestmark = pytest.mark.peft

TOL = 1e-5
CONFIGS = {
    "lora_all_linear": lambda: peft.LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False
    ),
    "ia3_default_targets": lambda: peft.IA3Config(task_type="SEQ_CLS", init_ia3_weights=False),
}


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 6), generator=gen)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0  # a right-padded row
    token_types = torch.zeros(3, 6, dtype=torch.long)
    token_types[:, 3:] = 1
    labels = torch.tensor([0, 2, 1])
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types, labels=labels)


def peft_targets(wrapped) -> set[str]:
    return {
        name.removeprefix("base_model.model.")
        for name, module in wrapped.named_modules()
        if hasattr(module, "base_layer") and not hasattr(module.base_layer, "base_layer")
    }


def ir_key(peft_name: str) -> str:
    """PEFT's parameter name -> peftdecl's key (adapter name and the modules_to_save level removed; prompt
    learning has no tuner model, so its names start with ``base_model.`` alone)."""
    key = peft_name.removeprefix("base_model.model.").removeprefix("base_model.")
    return key.replace(".modules_to_save.default", "").replace(".default", "")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_seq_cls_adapter_like_peft(kind: str, tmp_path) -> None:
    wrapped = peft_model(tiny_bert(), CONFIGS[kind]())
    perturb(wrapped)  # the classifier copy included
    wrapped.save_pretrained(tmp_path / "peft")
    ours = peftdecl.load_adapter(tiny_bert(), tmp_path / "peft")
    plan = ours.plan()
    assert set(plan.targets) == peft_targets(wrapped)
    assert "classifier" not in plan.targets and plan.modules_to_save == ("classifier",)

    batch = inputs()
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(**batch)
        got = ours(**batch)
    assert rel_err(got.logits.numpy(), expected.logits.numpy()) <= TOL
    assert rel_err(got.loss.item(), expected.loss.item()) <= TOL

    # the same spec attached by peftdecl: the same targets, and a file and config like PEFT's
    spec = json.loads(json.dumps(CONFIGS[kind]().to_dict(), default=sorted))
    fresh = peftdecl.attach(tiny_bert(), spec, seed=1)
    assert fresh.plan().targets == plan.targets and fresh.plan().modules_to_save == ("classifier",)
    fresh.save(tmp_path / "ours")
    assert_saved_like_peft(tmp_path / "ours", wrapped, shapes=True)
    if spec["target_modules"] is None:
        # peftdecl writes a null target_modules (and IA3's feedforward_modules) back as null where PEFT writes the
        # model type's default list; both reload to the same targets (compared above)
        defaults = ("target_modules", "feedforward_modules")
        mine, theirs = assert_config_like_peft(
            tmp_path / "ours", tmp_path / "peft", ignore=defaults, as_sets=()
        )
    else:
        mine, theirs = assert_config_like_peft(tmp_path / "ours", tmp_path / "peft")
    assert mine["modules_to_save"] == theirs["modules_to_save"] == ["classifier", "score"]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_same_loss_gradients_and_sgd_step_as_peft(kind: str, tmp_path) -> None:
    wrapped = peft_model(tiny_bert(), CONFIGS[kind]())
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(tiny_bert(), tmp_path, is_trainable=True)
    theirs = {ir_key(n): p for n, p in wrapped.named_parameters() if p.requires_grad}
    params = ours.trainable_parameters()
    assert set(params) == set(theirs)
    assert {"classifier.weight", "classifier.bias"} <= set(params)
    wrapped.eval()  # BERT's own dropout would draw different masks; gradients flow in eval mode too
    ours.eval()
    batch = inputs(seed=1)
    assert_loss_and_gradients_like_peft(wrapped, ours, theirs, TOL, batch)
    torch.optim.SGD(list(params.values()), lr=0.5).step()
    torch.optim.SGD(list(theirs.values()), lr=0.5).step()
    with torch.no_grad():
        assert rel_err(ours(**batch).logits.numpy(), wrapped(**batch).logits.numpy()) <= TOL


def test_all_linear_without_a_task_type_adapts_the_classifier_as_peft_does() -> None:
    config = peft.LoraConfig(r=2, target_modules="all-linear")
    wrapped = peft_model(tiny_bert(), config)
    ours = peftdecl.attach(tiny_bert(), json.loads(json.dumps(config.to_dict(), default=sorted)))
    assert "classifier" in ours.plan().targets
    assert set(ours.plan().targets) == peft_targets(wrapped) and ours.plan().modules_to_save == ()


def test_bare_bert_model_default_targets_and_merge(tmp_path) -> None:
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False)  # BERT's default: query, value
    wrapped = peft_model(tiny_bert(head="none"), config)
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(tiny_bert(head="none"), tmp_path)
    assert set(ours.plan().targets) == peft_targets(wrapped)
    batch = {k: v for k, v in inputs().items() if k != "labels"}
    with torch.no_grad():
        expected = wrapped(**batch).last_hidden_state
        assert rel_err(ours(**batch).last_hidden_state.numpy(), expected.numpy()) <= TOL
        ours.merge()
        assert rel_err(ours(**batch).last_hidden_state.numpy(), expected.numpy()) <= TOL


def test_seq_cls_head_is_excluded_on_the_numpy_reference_too() -> None:
    state, options = numpy_inputs(tiny_bert())
    assert options["classifier_head"] == "classifier" and options["output_head"] is None
    spec = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "target_modules": "all-linear"}
    reference = peftdecl.attach(state, spec, **options)
    assert reference.plan().targets == peftdecl.attach(tiny_bert(), spec).plan().targets
    assert "classifier" not in reference.plan().targets
    assert reference.plan().modules_to_save == ("classifier",)


def test_seq_cls_prompt_tuning_like_peft(tmp_path) -> None:
    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    wrapped = peft_model(tiny_bert(), config)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(tiny_bert(), tmp_path)
    batch = inputs()  # token type ids get T leading zeros, the per-sequence labels stay as they are
    with torch.no_grad():
        expected, got = wrapped(**batch), ours(**batch)
    assert got.logits.shape == expected.logits.shape == (3, 3)
    assert rel_err(got.logits.numpy(), expected.logits.numpy()) <= TOL
    assert rel_err(got.loss.item(), expected.loss.item()) <= TOL

    trained = assert_prompt_training_like_peft(wrapped, tiny_bert(), TOL, **batch)
    assert set(trained.trainable_parameters()) == {
        "prompt_embeddings",
        "classifier.weight",
        "classifier.bias",
    }


def test_seq_cls_prefix_tuning_on_bert_is_refused_clearly() -> None:
    ours = peftdecl.attach(
        tiny_bert(), {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 3}
    )
    with pytest.raises(PeftdeclError, match="BertForSequenceClassification takes none"):
        ours(**inputs())


def test_seq_cls_prompt_tuning_file_keys_both_ways(tmp_path) -> None:
    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    ours = peftdecl.attach(tiny_bert(), json.loads(json.dumps(config.to_dict(), default=sorted)), seed=4)
    with torch.no_grad():
        ours.trainable_parameters()["classifier.bias"].add_(0.5)
    ours.save(tmp_path)
    saved = assert_saved_like_peft(tmp_path, peft_model(tiny_bert(), config), shapes=True)
    assert "base_model.classifier.weight" in saved  # no tuner model between PeftModel and BERT here
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert rel_err(ours(**inputs()).logits.numpy(), loaded(**inputs()).logits.numpy()) <= TOL
