"""Prompt learning with ``task_type`` TOKEN_CLS and QUESTION_ANS on the torch backend against the real HF PEFT (tiny
BERT and tiny Llama with a token-classification or QA head, built from configs), float32: logits, loss and
gradients (prompt table and head copy) ≤ 1e-5 relative, files both ways.

PEFT keeps the T virtual positions in the head's output, hands labels and start/end positions over unchanged and
never passes QA's token type and position ids on; its prefix tuning needs a forward argument named
``past_key_values``, which no model has under transformers 5 (refused by both), so prefix tuning is compared on a
Llama whose forward takes its cache under that name.
"""

from __future__ import annotations

import json

import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from tests.conftest import rel_err
from tests.hf_models import peft, peft_model, perturb, tiny_bert, tiny_llama, torch, transformers
from tests.peft_parity import (
    assert_config_like_peft,
    assert_prompt_training_like_peft,
    assert_saved_like_peft,
)

pytestmark = pytest.mark.peft

TOL = 1e-5
T = 3
S = 6
MODELS = {  # name -> (builder, task_type, the head PEFT saves in full)
    "bert_token": (lambda: tiny_bert(head="token"), "TOKEN_CLS", "classifier"),
    "bert_qa": (lambda: tiny_bert(head="qa"), "QUESTION_ANS", "qa_outputs"),
    "llama_token": (lambda: tiny_llama(head="token"), "TOKEN_CLS", "score"),
    "llama_qa": (lambda: tiny_llama(head="qa"), "QUESTION_ANS", "qa_outputs"),
}
OUTPUTS = {"TOKEN_CLS": ("logits",), "QUESTION_ANS": ("start_logits", "end_logits")}


def _forward_with_past(
    self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, **kw
):
    return super(type(self), self).forward(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cache=past_key_values,
        inputs_embeds=inputs_embeds,
        **kw,
    )


def _taking_past_key_values(head: type) -> type:
    """``head`` taking its KV cache as ``past_key_values`` (the transformers 4 name PEFT looks for); the class name
    keeps the head's suffix, from which transformers picks the loss."""
    return type(f"PastKeyValues{head.__name__}", (head,), {"forward": _forward_with_past})


PAST_KEY_VALUES_HEADS = {
    "TOKEN_CLS": _taking_past_key_values(transformers.LlamaForTokenClassification),
    "QUESTION_ANS": _taking_past_key_values(transformers.LlamaForQuestionAnswering),
}


def past_key_values_llama(task: str):
    base = tiny_llama(head="token" if task == "TOKEN_CLS" else "qa")
    model = PAST_KEY_VALUES_HEADS[task](base.config).eval()
    model.load_state_dict(base.state_dict())
    return model


def inputs(model: str, task: str, virtual: int = T, seed: int = 0) -> dict:
    """A batch with a right-padded row; BERT also gets token types (they change its output, so shifting them, or
    not dropping them for QA, shows). ``virtual``: how many leading virtual positions the targets cover."""
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "input_ids": torch.randint(1, 100, (3, S), generator=gen),
        "attention_mask": torch.ones(3, S).long(),
    }
    batch["attention_mask"][1, 4:] = 0
    if model.startswith("bert"):
        batch["token_type_ids"] = torch.zeros(3, S, dtype=torch.long)
        batch["token_type_ids"][:, S // 2 :] = 1
    if task == "TOKEN_CLS":
        labels = torch.randint(0, 3, (3, virtual + S), generator=gen)
        labels[:, :virtual] = -100  # PEFT leaves the labels as given: they must cover the virtual positions
        labels[1, virtual + 4 :] = -100
        batch["labels"] = labels
    else:  # positions index the T + S outputs as given (one start on a virtual token, one end out of range)
        batch["start_positions"] = torch.tensor([1, virtual + 1, virtual + 3])
        batch["end_positions"] = torch.tensor([virtual + 2, virtual + 3, 50])
    return batch


def prompt_config(task: str):
    return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=T)


def spec_of(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=sorted))


def assert_same_outputs(got, expected, task: str) -> None:
    for field in OUTPUTS[task]:
        mine, theirs = getattr(got, field), getattr(expected, field)
        assert mine.shape == theirs.shape, field
        assert rel_err(mine.detach().numpy(), theirs.detach().numpy()) <= TOL, field


@pytest.mark.parametrize("model", sorted(MODELS))
def test_prompt_tuning_logits_loss_and_gradients_like_peft(model: str, tmp_path) -> None:
    make, task, head = MODELS[model]
    wrapped = peft_model(make(), prompt_config(task))
    perturb(wrapped)  # the head copy differs from the base model's head
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(make(), tmp_path)
    assert ours.plan().modules_to_save == (head,)
    batch = inputs(model, task)
    with torch.no_grad():
        expected, got = wrapped(**batch), ours(**batch)
    # the T virtual positions stay in the head's output, as in PEFT
    assert getattr(got, OUTPUTS[task][0]).shape[1] == T + S
    assert_same_outputs(got, expected, task)
    assert rel_err(got.loss.item(), expected.loss.item()) <= TOL

    # explicit position ids are dropped by both (BERT would refuse S ids for T + S embeddings)
    with torch.no_grad():
        shifted = ours(**batch, position_ids=torch.arange(S).expand(3, S) + 2)
    assert_same_outputs(shifted, expected, task)

    # training: the prompt table and the head copy get PEFT's gradients (≤ TOL relative)
    assert_prompt_training_like_peft(wrapped, make(), TOL, **inputs(model, task, seed=1))


@pytest.mark.parametrize("model", sorted(MODELS))
def test_prompt_tuning_files_both_ways(model: str, tmp_path) -> None:
    make, task, head = MODELS[model]
    config = prompt_config(task)
    ours = peftdecl.attach(make(), spec_of(config), seed=4)
    with torch.no_grad():
        ours.trainable_parameters()[f"{head}.bias"].add_(0.5)
    ours.save(tmp_path / "ours")
    reference = peft_model(make(), config)
    saved = assert_saved_like_peft(tmp_path / "ours", reference, shapes=True)
    assert f"base_model.{head}.weight" in saved  # no tuner model between PeftModel and the base model
    reference.save_pretrained(tmp_path / "peft")
    # PEFT's task wrapper appends its head names twice (["classifier", "score", "classifier", "score"]); peftdecl
    # writes each once, and both reload to the same modules
    assert_config_like_peft(tmp_path / "ours", tmp_path / "peft", as_sets=("modules_to_save",))

    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    batch = inputs(model, task)
    with torch.no_grad():
        got, expected = ours(**batch), loaded(**batch)
    assert_same_outputs(got, expected, task)
    assert rel_err(got.loss.item(), expected.loss.item()) <= TOL


@pytest.mark.parametrize("model", ["bert_token", "llama_token"])
def test_token_labels_without_the_virtual_positions_are_refused_as_peft_refuses_them(model: str) -> None:
    make, task, _ = MODELS[model]
    batch = inputs(model, task, virtual=0)  # (B, S) labels: PEFT fails on the shape mismatch
    with pytest.raises(ValueError, match="batch_size"):
        peft_model(make(), prompt_config(task))(**batch)
    ours = peftdecl.attach(make(), spec_of(prompt_config(task)))
    with pytest.raises(PeftdeclError, match=rf"labels must be \(batch, {T + S}\) with -100 in the first {T}"):
        ours(**batch)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_prefix_tuning_is_refused_where_peft_refuses_it(model: str) -> None:
    make, task, _ = MODELS[model]
    config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=T)
    batch = inputs(model, task, virtual=0)
    with pytest.raises(ValueError, match="past key values"):
        peft_model(make(), config)(**batch)
    base = make()
    name = type(base).__name__
    ours = peftdecl.attach(base, spec_of(config))
    why = "takes no KV cache" if model.startswith("bert") else "named 'cache'"
    with pytest.raises(PeftdeclError, match=rf"task_type {task} on {name}: .*{why}"):
        ours(**batch)


@pytest.mark.parametrize(
    ("task", "projection"), [("TOKEN_CLS", False), ("QUESTION_ANS", False), ("TOKEN_CLS", True)]
)
def test_prefix_tuning_like_peft_on_a_model_taking_past_key_values(
    task: str, projection: bool, tmp_path
) -> None:
    config = peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=T, prefix_projection=projection, encoder_hidden_size=16
    )
    wrapped = peft_model(past_key_values_llama(task), config)
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(past_key_values_llama(task), tmp_path)
    batch = inputs("llama", task, virtual=0)  # the cache adds no positions to the head's output
    with torch.no_grad():
        expected, got = wrapped(**batch), ours(**batch)
    assert getattr(got, OUTPUTS[task][0]).shape[1] == S
    assert_same_outputs(got, expected, task)
    assert rel_err(got.loss.item(), expected.loss.item()) <= TOL

    # explicit position ids: shifted by T for TOKEN_CLS, never passed on for QUESTION_ANS (as PEFT does)
    positions = torch.arange(S).expand(3, S) + 2
    with torch.no_grad():
        expected, got = wrapped(**batch, position_ids=positions), ours(**batch, position_ids=positions)
    assert_same_outputs(got, expected, task)
    assert_prompt_training_like_peft(wrapped, past_key_values_llama(task), TOL, **inputs("llama", task, 0, 1))
