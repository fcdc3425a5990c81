"""Issue 10 item 4: HF PEFT config objects and their ``to_dict()`` are specs, equal to what PEFT's own
``save_pretrained`` writes (checked against the real peft for every kind, with defaults and non-defaults)."""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import SpecError

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.peft

CASES = {
    "LORA": (peft.LoraConfig, {}),
    "LORA+": (
        peft.LoraConfig,
        {"r": 4, "lora_alpha": 16.5, "target_modules": ["v", "q", "k"], "lora_dropout": 0.1,
         "rank_pattern": {"q": 2}, "alpha_pattern": {"k": 3}, "use_rslora": True, "init_lora_weights": "gaussian",
         "task_type": "CAUSAL_LM", "exclude_modules": ["x"], "modules_to_save": ["head"]},
    ),
    "DORA": (peft.LoraConfig, {"use_dora": True, "target_modules": ["q"], "layers_to_transform": [0, 1],
                               "layers_pattern": "layers"}),
    "ADALORA": (peft.AdaLoraConfig, {"total_step": 100}),
    "ADALORA+": (peft.AdaLoraConfig, {"total_step": 100, "init_r": 6, "target_r": 2, "tinit": 5, "tfinal": 10,
                                      "target_modules": "model.*q", "beta1": 0.5}),
    "IA3": (peft.IA3Config, {}),
    "IA3+": (peft.IA3Config, {"target_modules": ["q", "f"], "feedforward_modules": ["f"], "init_ia3_weights": False}),
    "LOHA": (peft.LoHaConfig, {}),
    "LOHA+": (peft.LoHaConfig, {"r": 3, "alpha": 6, "rank_dropout": 0.2, "target_modules": {"a", "b"}}),
    "LOKR": (peft.LoKrConfig, {}),
    "LOKR+": (peft.LoKrConfig, {"decompose_both": True, "decompose_factor": 4, "init_weights": "lycoris"}),
    "OFT": (peft.OFTConfig, {}),
    "OFT+": (peft.OFTConfig, {"r": 4, "oft_block_size": 0, "coft": True, "eps": 1e-3, "target_modules": ["q"]}),
    "BOFT": (peft.BOFTConfig, {}),
    "BOFT+": (peft.BOFTConfig, {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2}),
    "VERA": (peft.VeraConfig, {}),
    "VERA+": (peft.VeraConfig, {"r": 16, "projection_prng_key": 7, "d_initial": 0.5, "target_modules": ["q"]}),
    "PREFIX_TUNING": (peft.PrefixTuningConfig, {"num_virtual_tokens": 5}),
    "PREFIX_TUNING+": (peft.PrefixTuningConfig, {"num_virtual_tokens": 5, "task_type": "SEQ_2_SEQ_LM",
                                                 "prefix_projection": True, "encoder_hidden_size": 32}),
    "PROMPT_TUNING": (peft.PromptTuningConfig, {"num_virtual_tokens": 5}),
    "PROMPT_TUNING+": (peft.PromptTuningConfig, {"num_virtual_tokens": 5, "task_type": "CAUSAL_LM",
                                                 "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi",
                                                 "tokenizer_name_or_path": "gpt2",
                                                 "tokenizer_kwargs": {"trust_remote_code": False}}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_object_dict_and_saved_file_give_one_spec(case, tmp_path) -> None:
    cls, kwargs = CASES[case]
    config = cls(**kwargs)
    from_object = peftdecl.load_spec(config)
    from_dict = peftdecl.load_spec(config.to_dict())
    config.save_pretrained(tmp_path)
    from_file = peftdecl.load_spec(tmp_path)
    assert from_object == from_dict == from_file
    assert from_object.peft_type == config.peft_type.value
    # every field PEFT emits is a field of ours, with PEFT's value (sets as sorted lists)
    ours = from_object.to_dict()
    for key, value in config.to_dict().items():
        assert key in ours, key
        expected = sorted(value) if isinstance(value, set) else getattr(value, "value", value)
        if isinstance(expected, (list, tuple)):
            expected = list(expected)
        assert ours[key] == expected, key


def test_target_module_sets_are_sorted_lists() -> None:
    data = peft.LoraConfig(target_modules=["v_proj", "q_proj", "k_proj"]).to_dict()
    assert isinstance(data["target_modules"], set)
    assert peftdecl.load_spec(data).target_modules == ("k_proj", "q_proj", "v_proj")
    # order and repeats mean nothing to PEFT (it keeps a set), so JSON lists are canonicalised the same way
    again = peftdecl.load_spec(
        {"peft_type": "LORA", "target_modules": ["v_proj", "q_proj", "k_proj", "q_proj"]}
    )
    assert again.target_modules == ("k_proj", "q_proj", "v_proj")


def test_unsupported_peft_fields_are_named() -> None:
    """megatron_config (a distributed-training integration) is the one LoraConfig field peftdecl refuses."""
    config = peft.LoraConfig(target_modules=["q"], megatron_config={"num_layers": 2})
    with pytest.raises(SpecError) as info:
        peftdecl.load_spec(config)
    assert "$.megatron_config" in dict(info.value.problems)
    assert info.value.source == "LoraConfig"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eva_config": "EVA", "init_lora_weights": "eva"},
        {"bias": "all"},
        {"kasa_config": "KASA"},
    ],
)
def test_peft_config_objects_with_nested_configs_load(kwargs) -> None:
    """A LoraConfig holding a nested dataclass (EvaConfig, KasaConfig) or a non-default bias gives the same spec as
    its dict form."""
    from peft.tuners.lora.config import EvaConfig, KasaConfig

    nested = {"EVA": EvaConfig, "KASA": KasaConfig}
    built = {key: nested[value]() if value in nested else value for key, value in kwargs.items()}
    config = peft.LoraConfig(target_modules=["q"], **built)
    assert peftdecl.load_spec(config) == peftdecl.load_spec(config.to_dict())


def test_attach_takes_a_peft_config() -> None:
    rng = np.random.default_rng(0)
    state = {"q.weight": rng.normal(size=(6, 4)), "k.weight": rng.normal(size=(6, 4))}
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q"], init_lora_weights=False)
    by_object = peftdecl.attach(state, config, backend="numpy", seed=3)
    by_dict = peftdecl.attach(state, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"],
                                      "init_lora_weights": False}, backend="numpy", seed=3)  # fmt: skip
    assert by_object.spec() == by_dict.spec().replace(peft_version=config.peft_version)
    x = rng.normal(size=(3, 4))
    np.testing.assert_array_equal(by_object("q", x), by_dict("q", x))
    assert not np.allclose(by_object("q", x), x @ state["q.weight"].T)  # the adapter is really there


def test_a_failing_to_dict_is_a_spec_error() -> None:
    class Broken:
        peft_type = "LORA"

        def to_dict(self) -> dict:
            raise RuntimeError("boom")

    with pytest.raises(SpecError, match=r"Broken.*to_dict"):
        peftdecl.load_spec(Broken())
