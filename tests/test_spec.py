"""Spec loading: every source form, every kind, PEFT's own configs, and precise errors."""

from __future__ import annotations

import json

import pytest

import peftdecl
from peftdecl.errors import SpecError
from peftdecl.spec import SPEC_TYPES


def problems(source) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        peftdecl.load_spec(source)
    return dict(info.value.problems)


def test_sources_json_yaml_str_bytes_dict(tmp_path) -> None:
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "a.yaml").write_text("peft_type: LORA\nr: 4\ntarget_modules: [q_proj]\n")
    (tmp_path / "a.yml").write_text("peft_type: LORA\nr: 4\ntarget_modules: [q_proj]\n")
    specs = [
        peftdecl.load_spec(tmp_path / "a.json"),
        peftdecl.load_spec(str(tmp_path / "a.yaml")),
        peftdecl.load_spec(tmp_path / "a.yml"),
        peftdecl.load_spec(json.dumps(data)),
        peftdecl.load_spec(json.dumps(data).encode()),
        peftdecl.load_spec(data),
        peftdecl.load_spec("peft_type: LORA\nr: 4\ntarget_modules: [q_proj]\n"),
    ]
    assert all(s == specs[0] for s in specs)
    assert specs[0].target_modules == ("q_proj",)


def test_specs_are_frozen() -> None:
    spec = peftdecl.load_spec({"peft_type": "LORA"})
    with pytest.raises(AttributeError):
        spec.r = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        ({"peft_type": "LORA", "r": "8"}, "$.r", "expected an integer"),
        ({"peft_type": "LORA", "r": 0}, "$.r", "must be >= 1"),
        ({"peft_type": "LORA", "lora_dropout": 1.5}, "$.lora_dropout", "must be < 1.0"),
        ({"peft_type": "LORA", "target_modules": ["q", 3]}, "$.target_modules", "a list of strings"),
        ({"peft_type": "LORA", "bias": "some"}, "$.bias", 'one of "all", "lora_only", "none"'),
        ({"peft_type": "LORA", "lora_dropot": 0.1}, "$.lora_dropot", "did you mean 'lora_dropout'"),
        ({"peft_type": "IA3", "r": 4}, "$.r", "belongs to LORA"),
        ({"peft_type": "LORAX"}, "$.peft_type", "did you mean 'LORA'"),
        ({"r": 4}, "$.peft_type", "is required"),
        ({"peft_type": "LORA", "layers_pattern": "layers"}, "$.layers_pattern", "needs layers_to_transform"),
        ({"peft_type": "LORA", "target_modules": ".*q", "layers_to_transform": [0]}, "$.layers_to_transform", "regex"),
        ({"peft_type": "LORA", "megatron_config": {"x": 1}}, "$.megatron_config", "not supported"),
        ({"peft_type": "LORA", "init_lora_weights": "mica", "use_dora": True}, "$.init_lora_weights", "use_dora"),
        ({"peft_type": "LORA", "use_dora": True, "lora_bias": True}, "$.lora_bias", "use_dora"),
        ({"peft_type": "OFT", "r": 4, "oft_block_size": 8}, "$.r", "exactly one"),
        ({"peft_type": "BOFT", "boft_block_size": 0}, "$.boft_block_size", "exactly one"),
        ({"peft_type": "ADALORA"}, "$.total_step", "total_step > 0"),
        ({"peft_type": "ADALORA", "total_step": 10, "tinit": 10}, "$.tinit", "must be <"),
        ({"peft_type": "PROMPT_TUNING"}, "$.num_virtual_tokens", "required"),
        ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT"},
         "$.prompt_tuning_init_text", "required"),
        ({"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": ["down"]},
         "$.feedforward_modules", "subset"),
    ],
)  # fmt: skip
def test_errors_name_the_json_path(data, path, fragment) -> None:
    found = problems(data)
    assert path in found, found
    assert fragment in found[path]


def test_all_problems_reported_at_once() -> None:
    found = problems({"peft_type": "LORA", "r": -1, "lora_alpah": 3, "bias": 1})
    assert {"$.r", "$.lora_alpah", "$.bias"} <= set(found)


def test_file_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"peft_type": "LORA", "r": }')
    with pytest.raises(SpecError, match=r"bad\.json: \$: not valid JSON"):
        peftdecl.load_spec(bad)
    with pytest.raises(SpecError, match="file not found"):
        peftdecl.load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("peft_type", sorted(SPEC_TYPES))
def test_every_kind_parses_with_defaults(peft_type) -> None:
    data = {"peft_type": peft_type}
    if peft_type == "ADALORA":
        data["total_step"] = 100
    if peft_type == "TRAINABLE_TOKENS":
        data["token_indices"] = [0, 1]  # PEFT's default, no tokens, trains nothing
    if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING"):
        data["num_virtual_tokens"] = 4
    spec = peftdecl.load_spec(data)
    assert spec.peft_type == peft_type
    again = peftdecl.load_spec(spec.to_dict())
    assert again == spec


@pytest.mark.peft
@pytest.mark.parametrize("peft_type", sorted(SPEC_TYPES))
def test_configs_written_by_peft_load(peft_type, tmp_path) -> None:
    """Every field HF PEFT writes is accepted, and the values round-trip."""
    peft = pytest.importorskip("peft")
    classes = {
        "LORA": (peft.LoraConfig, {"target_modules": ["q"], "use_dora": True, "rank_pattern": {"q": 2}}),
        "ADALORA": (peft.AdaLoraConfig, {"target_modules": ["q"], "total_step": 50}),
        "IA3": (peft.IA3Config, {"target_modules": ["q", "f"], "feedforward_modules": ["f"]}),
        "LOHA": (peft.LoHaConfig, {"target_modules": ["q"], "alpha": 4}),
        "LOKR": (peft.LoKrConfig, {"target_modules": ["q"], "decompose_both": True}),
        "OFT": (peft.OFTConfig, {"target_modules": ["q"], "oft_block_size": 8}),
        "BOFT": (peft.BOFTConfig, {"target_modules": ["q"], "boft_block_size": 4}),
        "VERA": (peft.VeraConfig, {"target_modules": ["q"], "r": 16}),
        "PREFIX_TUNING": (peft.PrefixTuningConfig, {"num_virtual_tokens": 5, "task_type": "CAUSAL_LM"}),
        "PROMPT_TUNING": (peft.PromptTuningConfig, {"num_virtual_tokens": 5, "task_type": "CAUSAL_LM"}),
        "TRAINABLE_TOKENS": (
            peft.TrainableTokensConfig,
            {"target_modules": ["emb"], "token_indices": [1, 2]},
        ),
    }
    cls, kwargs = classes[peft_type]
    cls(**kwargs).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    spec = peftdecl.load_spec(tmp_path / "adapter_config.json")
    assert spec.peft_type == peft_type
    ours = spec.to_dict()
    for key, value in written.items():
        if key in ours and key != "runtime_config":
            assert _norm(ours[key]) == _norm(value), key


def _norm(value):
    if isinstance(value, (list, tuple)):
        return sorted(map(_norm, value), key=repr)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def test_schema_files_are_current() -> None:
    from peftdecl.schema import default_dir, stale_files

    assert stale_files(default_dir()) == []
