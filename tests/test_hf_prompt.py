"""Prefix and prompt tuning files both ways against the real HF PEFT (tiny Llama with GQA, tiny T5).

Tolerances: tables and key/value prefixes read from a float32 file are compared element for element (after
casting ours to float32); logits of a PEFT model vs the base model fed our prefix / prompt ≤ 1e-5 relative
(float32 forward); a live PEFT projection encoder vs the float64 reference ≤ 1e-6 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from peftdecl_numpy.kinds.prompt import prepend_virtual_tokens
from tests.conftest import rel_err
from tests.hf_models import numpy_inputs, peft, peft_model, tiny_llama, torch, transformers
from tests.peft_parity import assert_config_like_peft, assert_saved_like_peft

LOGITS_TOL = 1e-5
LIVE_TOL = 1e-6
T = 5

pytestmark = pytest.mark.peft


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def peft_kv(cache) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (K, V) of the self-attention cache PEFT's get_prompt builds (transformers 5.x layers)."""
    cache = getattr(cache, "self_attention_cache", cache)
    return [
        (layer.keys.detach().double().numpy(), layer.values.detach().double().numpy())
        for layer in cache.layers
    ]


def assert_kv_equal(ours: list[tuple[np.ndarray, ...]], theirs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    assert len(ours) == len(theirs)
    for mine, (k, v) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(mine[0].astype(np.float32), k)
        np.testing.assert_array_equal(mine[1].astype(np.float32), v)


def inputs(batch: int = 2, length: int = 4, vocab: int = 128) -> tuple:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 0] = 0  # a left-padded row
    return ids, mask


def logits_with_our_prefix(ours: peftdecl.AdaptedModel, ids, mask) -> np.ndarray:
    """The base model run as PEFT runs it: our prefix as the cache, the mask extended with T ones."""
    kv = [
        tuple(torch.tensor(t, dtype=torch.float32) for t in pair)
        for pair in ours.prefix_key_values(ids.shape[0])
    ]
    cache = transformers.DynamicCache(kv)
    full_mask = torch.cat([torch.ones(ids.shape[0], T, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return (
            tiny_llama()(input_ids=ids, attention_mask=full_mask, past_key_values=cache)
            .logits.double()
            .numpy()
        )


PREFIX_CASES = {"table": {}, "projection": {"prefix_projection": True, "encoder_hidden_size": 24}}


@pytest.mark.parametrize("case", sorted(PREFIX_CASES))
def test_peft_saved_prefix_gives_peft_key_values(case: str, tmp_path) -> None:
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, **PREFIX_CASES[case])
    wrapped = peft_model(tiny_llama(), config)
    wrapped.save_pretrained(tmp_path)
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.load_adapter(state, tmp_path, **options)
    pp = ours.plan().prompt
    assert (pp.token_dim, pp.num_attention_heads, pp.num_layers) == (32, 2, 2)  # GQA: 2 KV heads of 16
    assert ours.prompt_table().shape == (T, 2 * 2 * 32)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_kv_equal(ours.prefix_key_values(3), peft_kv(loaded.get_prompt(3)))
    live = peft_kv(wrapped.get_prompt(3))  # the training-mode encoder (the MLP for "projection")
    for mine, theirs in zip(ours.prefix_key_values(3), live, strict=True):
        assert rel_err(mine[0], theirs[0]) <= LIVE_TOL and rel_err(mine[1], theirs[1]) <= LIVE_TOL


@pytest.mark.parametrize("case", sorted(PREFIX_CASES))
def test_peftdecl_saved_prefix_loads_in_peft(case: str, tmp_path) -> None:
    state, options = numpy_inputs(tiny_llama())
    spec = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": T,
        **PREFIX_CASES[case],
    }
    ours = peftdecl.attach(state, spec, seed=3, **options)
    ours.save(tmp_path / "ours")

    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, **PREFIX_CASES[case])
    reference = peft_model(tiny_llama(), config)
    assert_saved_like_peft(tmp_path / "ours", reference)
    reference.save_pretrained(tmp_path / "theirs")
    assert_config_like_peft(tmp_path / "ours", tmp_path / "theirs", ignore=("peft_version",), as_sets=())

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert_kv_equal(ours.prefix_key_values(2), peft_kv(loaded.get_prompt(2)))
    ids, mask = inputs()
    with torch.no_grad():
        expected = loaded(input_ids=ids, attention_mask=mask).logits.double().numpy()
    assert expected.shape == (2, 4, 128)  # prefix tuning adds no output positions
    assert rel_err(logits_with_our_prefix(ours, ids, mask), expected) <= LOGITS_TOL
    with torch.no_grad():
        plain = tiny_llama()(input_ids=ids, attention_mask=mask).logits.double().numpy()
    assert rel_err(plain, expected) > 1e-3  # the prefix really changes the logits


def test_projection_parameters_named_like_peft_give_peft_table() -> None:
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, prefix_projection=True)
    wrapped = peft_model(tiny_llama(), config)
    encoder = wrapped.prompt_encoder["default"]
    arrays = {k: v.detach().double().numpy() for k, v in encoder.state_dict().items()}
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.attach(
        state,
        {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": T,
            "prefix_projection": True,
        },
        **options,
    )
    ours.add_adapter("copy", {**ours.spec().to_dict()}, arrays=arrays, activate=True)
    expected = wrapped.get_prompt_embedding_to_save("default").double().numpy()
    assert rel_err(ours.prompt_table("copy"), expected) <= LIVE_TOL


@pytest.mark.parametrize("kind", ["PREFIX_TUNING", "PROMPT_TUNING"])
def test_t5_seq2seq_tables(kind: str, tmp_path) -> None:
    config_cls = peft.PrefixTuningConfig if kind == "PREFIX_TUNING" else peft.PromptTuningConfig
    wrapped = peft_model(tiny_t5(), config_cls(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    wrapped.save_pretrained(tmp_path)
    state, options = numpy_inputs(tiny_t5())
    ours = peftdecl.load_adapter(state, tmp_path, **options)
    assert ours.plan().prompt.num_transformer_submodules == 2
    saved = peft.utils.load_peft_weights(str(tmp_path))["prompt_embeddings"].double().numpy()
    np.testing.assert_array_equal(ours.prompt_table(), saved)
    if kind == "PROMPT_TUNING":
        assert saved.shape == (2 * 3, 32)  # T rows for the encoder, T for the decoder
        return
    assert saved.shape == (3, 2 * 2 * 32)
    cache = wrapped.get_prompt(2)
    assert len(cache.cross_attention_cache) == 0  # PEFT empties the cross-attention part
    kv = ours.prefix_key_values(2)
    assert all(len(group) == 4 for group in kv)
    assert_kv_equal(kv, peft_kv(cache))
    # PEFT's doubled slots, cut in fours, give layer 1 of a 2-layer model the same prefix as layer 0
    np.testing.assert_array_equal(kv[1][0], kv[0][0])


def test_peft_saved_prompt_table_and_logits(tmp_path) -> None:
    wrapped = peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    wrapped.save_pretrained(tmp_path)
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.load_adapter(state, tmp_path, **options)
    np.testing.assert_array_equal(
        ours.prompt_table(), wrapped.get_prompt_embedding_to_save("default").numpy()
    )

    ids, mask = inputs()
    labels = ids.clone()
    with torch.no_grad():
        expected = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    assert expected.logits.shape == (2, 6 + 4, 128)  # T extra leading positions
    embeds, full_mask, full_labels = prepend_virtual_tokens(
        ours.prompt_table(), state["model.embed_tokens.weight"][ids.numpy()], mask.numpy(), labels.numpy()
    )
    with torch.no_grad():
        got = tiny_llama()(
            inputs_embeds=torch.tensor(embeds, dtype=torch.float32),
            attention_mask=torch.tensor(full_mask),
            labels=torch.tensor(full_labels),
        )
    assert rel_err(got.logits.double().numpy(), expected.logits.double().numpy()) <= LOGITS_TOL
    assert abs(float(got.loss) - float(expected.loss)) <= LOGITS_TOL * abs(float(expected.loss))


def test_peftdecl_saved_prompt_loads_in_peft(tmp_path) -> None:
    state, options = numpy_inputs(tiny_llama())
    spec = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 6}
    ours = peftdecl.attach(state, spec, seed=5, **options)
    ours.save(tmp_path / "ours")
    reference = peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    assert_saved_like_peft(tmp_path / "ours", reference)
    reference.save_pretrained(tmp_path / "theirs")
    assert_config_like_peft(tmp_path / "ours", tmp_path / "theirs", ignore=("peft_version",), as_sets=())
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    np.testing.assert_array_equal(
        ours.prompt_table().astype(np.float32), loaded.get_prompt_embedding_to_save("default").numpy()
    )


@pytest.fixture
def word_tokenizer(tmp_path) -> str:
    """A 21-word WordLevel tokenizer saved as a local transformers tokenizer folder (no downloads)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(20)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder = tmp_path / "tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("tokens", [6, 3])  # repeated (4 text tokens → 6) and truncated
def test_text_init_uses_the_same_token_rows_as_peft(tokens: int, word_tokenizer: str) -> None:
    fields = dict(
        task_type="CAUSAL_LM",
        num_virtual_tokens=tokens,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w3 w5 w7 w9",
        tokenizer_name_or_path=word_tokenizer,
    )
    wrapped = peft_model(tiny_llama(), peft.PromptTuningConfig(**fields))
    state, options = numpy_inputs(tiny_llama())
    ours = peftdecl.attach(state, {"peft_type": "PROMPT_TUNING", **fields}, **options)
    expected = wrapped.get_prompt_embedding_to_save("default").double().numpy()
    np.testing.assert_array_equal(ours.prompt_table(), expected)
    ids = transformers.AutoTokenizer.from_pretrained(word_tokenizer)("w3 w5 w7 w9")["input_ids"]
    rows = [(ids * 2)[i] for i in range(tokens)]
    np.testing.assert_array_equal(ours.prompt_table(), state["model.embed_tokens.weight"][rows])
