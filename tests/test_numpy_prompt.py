"""The NumPy reference prefix and prompt tuning: sizes, KV layout, projection, gradients, prepending, files.

Tolerances: the KV layout is a pure re-indexing (compared exactly); gradients vs float64 central differences
(tests/gradcheck.py's FD_EPS / FD_TOL); float32 files round-trip within 1e-6 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.plan import PromptPlan
from peftdecl_numpy.kinds import prompt as prompt_math
from tests.conftest import rel_err
from tests.gradcheck import FD_EPS, FD_TOL
from tests.numpy_checks import SEEDS, sizes

VOCAB, HIDDEN = 11, 8
# a model described by facts only: 3 layers, hidden 8, 4 heads, 2 key/value heads of size 2
FACTS = dict(num_layers=3, hidden_size=HIDDEN, num_attention_heads=4, word_embeddings="embed")


def base_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"embed.weight": rng.normal(size=(VOCAB, HIDDEN)), "head.weight": rng.normal(size=(VOCAB, HIDDEN))}


def attach(spec: dict, seed: int = 0, **facts) -> peftdecl.AdaptedModel:
    return peftdecl.attach(
        base_state(), spec, layer_types={"embed": "embedding"}, seed=seed, **{**FACTS, **facts}
    )


def prefix_spec(**fields) -> dict:
    return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, **fields}


def prompt_spec(**fields) -> dict:
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5, **fields}


def test_prefix_sizes_follow_the_model_and_grouped_query_attention() -> None:
    plain = attach(prefix_spec()).plan().prompt
    assert (plain.token_dim, plain.num_attention_heads, plain.num_layers) == (HIDDEN, 4, 3)
    gqa = attach(prefix_spec(), num_key_value_heads=2, head_dim=2).plan().prompt
    assert (gqa.token_dim, gqa.num_attention_heads) == (2 * 2, 2)  # head_dim · n_kv, n_kv heads
    assert attach(prefix_spec(), num_key_value_heads=2, head_dim=2).prompt_table().shape == (4, 2 * 3 * 4)


def test_prefix_kv_layout_is_peft_flat_index() -> None:
    model = attach(prefix_spec(), num_key_value_heads=2, head_dim=2)
    pp, table = model.plan().prompt, model.prompt_table()
    kv = model.prefix_key_values(batch_size=2)
    heads, dim = pp.num_attention_heads, pp.token_dim // pp.num_attention_heads
    assert len(kv) == pp.num_layers
    for layer, pair in enumerate(kv):
        assert len(pair) == 2
        for which, tensor in enumerate(pair):
            assert tensor.shape == (2, heads, 4, dim)
            for b, h, t, d in np.ndindex(tensor.shape):
                assert tensor[b, h, t, d] == table[t, ((2 * layer + which) * heads + h) * dim + d]


def test_zero_init_and_projection_zero_init() -> None:
    np.testing.assert_array_equal(attach(prefix_spec(init_weights="zero")).prompt_table(), 0.0)
    model = attach(prefix_spec(init_weights="zero", prefix_projection=True, encoder_hidden_size=6))
    p = model.state_dict()
    assert p["transform.0.weight"].shape == (6, HIDDEN) and p["transform.2.weight"].shape == (
        2 * 3 * HIDDEN,
        6,
    )
    assert np.std(p["embedding.weight"]) > 0 and np.std(p["transform.0.weight"]) > 0
    np.testing.assert_array_equal(model.prompt_table(), 0.0)  # the last projection starts at zero


def _dot(first: list[tuple[np.ndarray, ...]], second: list[tuple[np.ndarray, ...]]) -> float:
    """Σ over layers and tensors of ⟨a, b⟩."""
    return sum(
        float(np.sum(a * b))
        for ga, gb in zip(first, second, strict=True)
        for a, b in zip(ga, gb, strict=True)
    )


def _fd_check(model: peftdecl.AdaptedModel, loss_and_grads, seed: int = 0) -> list[str]:
    """Directional central differences of every trainable tensor against the explicit gradients."""
    _, grads = loss_and_grads()
    checked, rng = [], np.random.default_rng(seed)
    for key, value in model.trainable_parameters().items():
        direction = rng.normal(size=value.shape)
        original = value.copy()
        value[...] = original + FD_EPS * direction
        plus = loss_and_grads()[0]
        value[...] = original - FD_EPS * direction
        minus = loss_and_grads()[0]
        value[...] = original
        numeric = (plus - minus) / (2 * FD_EPS)
        analytic = float(np.sum(grads[key] * direction))
        assert abs(numeric - analytic) <= FD_TOL * max(1.0, abs(numeric)), (key, numeric, analytic)
        checked.append(key)
    return checked


@pytest.mark.parametrize("fields", [{}, {"prefix_projection": True, "encoder_hidden_size": 5}])
@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_prefix_gradients_match_finite_differences(fields: dict, task: str) -> None:
    model = attach(prefix_spec(task_type=task, **fields), num_key_value_heads=2, head_dim=2)
    pp = model.plan().prompt
    weights = [
        tuple(np.random.default_rng(i + j).normal(size=t.shape) for j, t in enumerate(g))
        for i, g in enumerate(model.prefix_key_values(3))
    ]

    def loss_and_grads():
        kv = model.prefix_key_values(3)
        loss = _dot(kv, weights)
        return loss, model.prompt_backward(prompt_math.key_values_backward(pp, weights))

    checked = _fd_check(model, loss_and_grads)
    assert len(checked) == (5 if fields else 1)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_prompt_tuning_prepend_and_gradients(task: str) -> None:
    model = attach(prompt_spec(task_type=task))
    rows = 5 * (2 if task == "SEQ_2_SEQ_LM" else 1)
    assert model.prompt_table().shape == (rows, HIDDEN)
    rng = np.random.default_rng(1)
    ids, head = rng.integers(0, VOCAB, size=(2, 3)), rng.normal(size=(HIDDEN, 4))
    target = rng.normal(size=(2, rows + 3, 4))

    def loss_and_grads():
        embeds, _, _ = prompt_math.prepend_virtual_tokens(
            model.prompt_table(), base_state()["embed.weight"][ids]
        )
        out = np.tanh(embeds @ head)  # a stand-in for the network
        d_embeds = ((1 - out**2) * target) @ head.T
        d_prompt, _ = prompt_math.prepend_backward(d_embeds, rows)
        return float(np.sum(out * target)), model.prompt_backward(d_prompt)

    assert _fd_check(model, loss_and_grads) == ["prompt_embeddings"]


def test_prepend_extends_mask_and_labels_like_peft() -> None:
    rng = np.random.default_rng(0)
    prompt, embeds = rng.normal(size=(5, HIDDEN)), rng.normal(size=(2, 3, HIDDEN))
    mask, labels = np.array([[1, 1, 0], [1, 1, 1]]), np.array([[4, 5, -100], [1, 2, 3]])
    out, out_mask, out_labels = prompt_math.prepend_virtual_tokens(prompt, embeds, mask, labels)
    assert out.shape == (2, 8, HIDDEN)
    np.testing.assert_array_equal(out[:, :5], np.stack([prompt, prompt]))
    np.testing.assert_array_equal(out[:, 5:], embeds)
    np.testing.assert_array_equal(out_mask, np.concatenate([np.ones((2, 5), int), mask], axis=1))
    np.testing.assert_array_equal(out_labels, np.concatenate([np.full((2, 5), -100), labels], axis=1))


def test_prompt_init_from_vocabulary_rows() -> None:
    embed = base_state()["embed.weight"]
    table = attach(prompt_spec(prompt_tuning_init="SAMPLE_VOCAB"), seed=4).prompt_table()
    for row in table:
        assert np.any(np.all(embed == row, axis=1))  # every virtual token starts as a real token's embedding
    again = attach(prompt_spec(prompt_tuning_init="SAMPLE_VOCAB"), seed=4).prompt_table()
    np.testing.assert_array_equal(table, again)
    with pytest.raises(peftdecl.TargetError, match="word_embeddings"):
        attach(prompt_spec(prompt_tuning_init="SAMPLE_VOCAB"), word_embeddings=None)


def test_repeat_to_truncates_or_cycles() -> None:
    from peftdecl.plan.kinds.prompt import repeat_to

    assert repeat_to([3, 5, 7, 9], 6) == [3, 5, 7, 9, 3, 5]
    assert repeat_to([3, 5, 7, 9], 3) == [3, 5, 7]


def test_text_init_with_an_unloadable_tokenizer_is_a_clear_error(tmp_path) -> None:
    pytest.importorskip("transformers")
    spec = prompt_spec(
        prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer_name_or_path=str(tmp_path)
    )
    with pytest.raises(peftdecl.PeftdeclError, match=r"\$\.tokenizer_name_or_path .* could not be loaded"):
        attach(spec)


def test_missing_model_facts_name_the_field() -> None:
    with pytest.raises(peftdecl.TargetError, match=r"\$\.num_layers is null .* num_layers=\.\.\."):
        peftdecl.attach(base_state(), prefix_spec(), hidden_size=HIDDEN, num_attention_heads=4)
    spec = prefix_spec(num_layers=2, token_dim=8, num_attention_heads=3)
    with pytest.raises(peftdecl.TargetError, match="token_dim 8 is not a multiple of num_attention_heads 3"):
        peftdecl.attach(base_state(), spec)


def test_prompt_adapters_cannot_be_merged() -> None:
    model = attach(prompt_spec())
    with pytest.raises(peftdecl.PeftdeclError, match="cannot be merged"):
        model.merge()


@pytest.mark.parametrize("spec", [prefix_spec(prefix_projection=True), prompt_spec()])
def test_save_writes_the_table_and_filled_sizes(spec: dict, tmp_path) -> None:
    import json

    model = attach(spec, num_key_value_heads=2, head_dim=2)
    model.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    pp = model.plan().prompt
    assert [
        config[k] for k in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")
    ] == [pp.token_dim, pp.num_layers, pp.num_attention_heads, 1]
    again = peftdecl.load_adapter(
        base_state(), tmp_path, layer_types={"embed": "embedding"}, **FACTS, num_key_value_heads=2, head_dim=2
    )
    assert set(again.state_dict()) == {
        "prompt_embeddings"
    }  # a reloaded projection adapter is the plain table
    assert rel_err(again.prompt_table(), model.prompt_table()) <= 1e-6  # float32 file


@settings(max_examples=25, deadline=None)
@given(
    **sizes(tokens=(1, 4), layers=(1, 3), heads=(1, 3), head_dim=(1, 3), batch=(1, 3)),
    submodules=st.sampled_from([1, 2]),
    seed=SEEDS,
)
def test_kv_split_and_its_adjoint_property(tokens, layers, heads, head_dim, submodules, batch, seed) -> None:
    pp = PromptPlan("prefix_tuning", tokens, heads * head_dim, layers, heads, submodules)
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(tokens, 2 * layers * heads * head_dim))
    kv = prompt_math.key_values(pp, table, batch)
    assert len(kv) == layers and all(len(g) == 2 * submodules for g in kv)
    slots = 2 * layers
    for layer, group in enumerate(kv):
        for j, tensor in enumerate(group):
            slot = (2 * submodules * layer + j) % slots  # PEFT's doubled slots, cut in groups of 2·S
            expected = table.reshape(tokens, slots, heads, head_dim)[:, slot].transpose(1, 0, 2)
            np.testing.assert_array_equal(tensor, np.broadcast_to(expected, (batch, *expected.shape)))
    # key_values is linear, so its backward must be its exact adjoint: <KV(P), G> = <P, KVᵀ(G)>
    grads = [tuple(rng.normal(size=t.shape) for t in g) for g in kv]
    lhs = _dot(kv, grads)
    rhs = float(np.sum(table * prompt_math.key_values_backward(pp, grads)))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))
