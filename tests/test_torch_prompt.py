"""Prompt and prefix tuning on the torch backend against the real HF PEFT (tiny Llama with grouped-query
attention, tiny GPT-2), float32: logits and loss ≤ 1e-5 relative, the table's gradient ≤ 1e-5, greedy generation
token for token (against greedy decoding by PEFT's forward), files both ways.
"""

from __future__ import annotations

import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from tests.conftest import rel_err
from tests.hf_models import peft, tiny_gpt2, tiny_llama, torch
from tests.peft_parity import (
    assert_prompt_training_like_peft,
    load_peft_saved_prompt,
    peft_prompt_model,
    prompt_configs,
)

pytestmark = pytest.mark.peft

TOL = 1e-5
T = 5
CONFIGS = prompt_configs("CAUSAL_LM", T)
MODELS = {"llama": (tiny_llama, 128), "gpt2": (tiny_gpt2, 100)}


def batch(vocab: int, rows: int = 2, length: int = 6, seed: int = 0):
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_same_logits_loss_and_table_gradient_as_peft(kind: str, model: str, tmp_path) -> None:
    make, vocab = MODELS[model]
    wrapped, ours = load_peft_saved_prompt(make, CONFIGS[kind](), tmp_path)
    ids, mask = batch(vocab)
    with torch.no_grad():
        expected = wrapped(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert got.shape == expected.shape  # prompt tuning: T extra leading positions, as in PEFT
    assert rel_err(got.numpy(), expected.numpy()) <= TOL

    # training: ours attached from PEFT's live config and values gives PEFT's loss and gradients
    assert_prompt_training_like_peft(wrapped, make(), TOL, input_ids=ids, attention_mask=mask, labels=ids)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_greedy_generation_equals_greedy_decoding_by_peft_forward(kind: str, tmp_path) -> None:
    # PEFT 0.21.2's generate is off under transformers 5: its override looks for past_key_values while the model's
    # inputs now name the cache `cache`, so prompt tuning prepends the prompt again on every step and prefix tuning
    # sets its prefix beside the model's own (empty) cache, which wins. The reference is therefore the argmax loop
    # over PEFT's forward; for prefix tuning with the position ids generate derives from the mask (cumsum − 1, 1 on
    # padding; PEFT shifts them by T), prompt tuning drops position ids in both.
    wrapped, ours = load_peft_saved_prompt(tiny_llama, CONFIGS[kind](), tmp_path)
    wrapped.eval()
    ids, mask = batch(128, length=4, seed=3)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = ours.generate(input_ids=ids, attention_mask=mask, **settings)
    plain = tiny_llama().generate(input_ids=ids, attention_mask=mask, **settings)
    assert not torch.equal(got, plain)  # the virtual tokens change what is generated
    tokens = ids
    with torch.no_grad():
        for _ in range(6):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1) if kind == "prefix" else None
            logits = wrapped(input_ids=tokens, attention_mask=mask, position_ids=positions).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    assert torch.equal(got, tokens)
    assert "prepare_inputs_for_generation" not in ours.base_model.__dict__  # the override is gone again


def test_projection_training_saves_the_projected_table_for_peft(tmp_path) -> None:
    spec = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": T,
        "prefix_projection": True,
        "encoder_hidden_size": 16,
    }
    ours = peftdecl.attach(tiny_llama(), spec, seed=2)
    assert {"embedding.weight", "transform.0.weight", "transform.2.bias"} <= set(ours.trainable_parameters())
    ids, mask = batch(128)
    ours.save(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert (
            rel_err(
                ours(input_ids=ids, attention_mask=mask).logits.numpy(),
                loaded(input_ids=ids, attention_mask=mask).logits.numpy(),
            )
            <= TOL
        )
    with ours.disable_adapters(), torch.no_grad():
        plain = ours(input_ids=ids, attention_mask=mask).logits
    assert (
        rel_err(plain.numpy(), tiny_llama()(input_ids=ids, attention_mask=mask).logits.detach().numpy()) == 0
    )


def test_prompt_adapters_refuse_mixed_batches_and_positional_extras(tmp_path) -> None:
    peft_prompt_model(tiny_llama, CONFIGS["prompt"]()).save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(tiny_llama(), tmp_path)
    ids, mask = batch(128)
    with pytest.raises(PeftdeclError, match="mixed batches"):
        ours(input_ids=ids, adapter_names=["default", "__base__"])
    with pytest.raises(PeftdeclError, match="by keyword"):
        ours(ids, mask)
