"""Issue 10 item 13: the published JSON Schema (schemas/adapter.schema.json) and ``load_spec`` accept exactly the
same specs. The only inputs left out are those whose sole problems are the rules JSON Schema cannot state
(``peftdecl.spec.rules.NOT_EXPRESSIBLE``: Python regex validity, IA3's subset rule, AdaLoRA's tinit bound and
the resource limits), each recognised by its own message."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given

import peftdecl
from peftdecl.errors import SpecError
from peftdecl.spec.rules import (
    ADALORA_SCHEDULE_RULE,
    BDLORA_OVERLAP_RULE,
    IA3_SUBSET_RULE,
    REGEX_RULE,
    RESOURCE_RULE,
)
from tests.fuzz_settings import fuzz_settings
from tests.spec_strategies import mutated_specs

SCHEMA = json.loads(
    (Path(__file__).parent.parent / "schemas" / "adapter.schema.json").read_text(encoding="utf-8")
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
SEEN: Counter[str] = Counter()


def excluded_rule(path: str, message: str) -> str | None:
    """The NOT_EXPRESSIBLE rule a load_spec problem belongs to, or None."""
    if "regular expression" in message:
        return REGEX_RULE
    if path == "$.feedforward_modules" and "subset of target_modules" in message:
        return IA3_SUBSET_RULE
    if path == "$.tinit" and "total_step - tfinal" in message:
        return ADALORA_SCHEDULE_RULE
    if path == "$.use_bdlora.target_modules_bd_b" and "also in target_modules_bd_a" in message:
        return BDLORA_OVERLAP_RULE
    if any(s in message for s in ("nested deeper", "values in one spec", "out of range (at most 64 bits)")):
        return RESOURCE_RULE
    return None


def check_agreement(data: dict) -> str:
    """'accept', 'reject' or 'excluded:<rule>'; fails when the schema and load_spec disagree otherwise."""
    schema_ok = VALIDATOR.is_valid(data)
    try:
        peftdecl.load_spec(data)
    except SpecError as error:
        if not schema_ok:
            return "reject"
        rules = {excluded_rule(path, message) for path, message in error.problems}
        assert None not in rules, f"schema accepts but load_spec refuses {data!r}: {error}"
        return "excluded:" + ",".join(sorted(rules))
    assert schema_ok, f"load_spec accepts but the schema refuses {data!r}: " + "; ".join(
        e.message[:100] for e in VALIDATOR.iter_errors(data)
    )
    return "accept"


@fuzz_settings(300, deadline=2000)
@given(mutated_specs())
def test_schema_and_load_spec_agree(data) -> None:
    SEEN[check_agreement(data)] += 1


@pytest.mark.parametrize(
    "data",
    [
        {"peft_type": "lora"},
        {"peft_type": "LORA", "r": 8.0},
        {"peft_type": "LORA", "r": 8.5},
        {"peft_type": "LORA", "lora_alpha": float("nan")},
        {"peft_type": "LORA", "alpha_pattern": {"q": float("inf")}},
        {"peft_type": "LORA", "megatron_config": {"a": 1}},
        {"peft_type": "LORA", "bias": "all"},
        {"peft_type": "LORA", "init_lora_weights": "pissa"},
        {"peft_type": "LORA", "init_lora_weights": "gaussian", "lora_bias": True},
        {"peft_type": "LORA", "use_dora": True, "lora_bias": True},
        {"peft_type": "LORA", "target_modules": "q.*", "layers_to_transform": [0]},
        {"peft_type": "LORA", "target_modules": ["q"], "layers_pattern": "layers"},
        {"peft_type": "ADALORA"},
        {"peft_type": "ADALORA", "total_step": None},
        {"peft_type": "ADALORA", "total_step": 0},
        {"peft_type": "ADALORA", "total_step": 5, "use_dora": True},
        {"peft_type": "OFT"},
        {"peft_type": "OFT", "r": 4},
        {"peft_type": "OFT", "r": 4, "oft_block_size": 0},
        {"peft_type": "OFT", "oft_block_size": 0},
        {"peft_type": "OFT", "r": 0.0, "oft_block_size": 0.0},
        {"peft_type": "BOFT"},
        {"peft_type": "BOFT", "boft_block_num": 2},
        {"peft_type": "BOFT", "boft_block_num": 2, "boft_block_size": 0},
        {"peft_type": "BOFT", "boft_block_size": 0},
        {"peft_type": "PROMPT_TUNING"},
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": None},
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "TEXT"},
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "TEXT",
         "prompt_tuning_init_text": "", "tokenizer_name_or_path": "t"},
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "TEXT",
         "prompt_tuning_init_text": "a", "tokenizer_name_or_path": "t", "tokenizer_kwargs": {"a": 1}},
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "tokenizer_kwargs": {"a": 1}},
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "tokenizer_kwargs": {}},
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "num_transformer_submodules": 3},
        {"peft_type": "VERA", "d_initial": float("-inf")},
        {"peft_type": "LOKR", "init_weights": "lycoris", "decompose_factor": -1},
    ],
)  # fmt: skip
def test_known_disagreements_are_gone(data) -> None:
    """The classes of the issue's 564 disagreements, each pinned."""
    assert check_agreement(data) in ("accept", "reject")


def test_exclusions_are_only_the_named_rules() -> None:
    assert check_agreement({"peft_type": "LORA", "target_modules": "("}) == f"excluded:{REGEX_RULE}"
    ia3 = {"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": ["f"]}
    assert check_agreement(ia3) == f"excluded:{IA3_SUBSET_RULE}"
    adalora = {"peft_type": "ADALORA", "total_step": 10, "tinit": 8, "tfinal": 5}
    assert check_agreement(adalora) == f"excluded:{ADALORA_SCHEDULE_RULE}"


def test_each_rule_not_expressible_is_described_in_the_schema() -> None:
    from peftdecl.spec.rules import NOT_EXPRESSIBLE, not_expressible

    for peft_type, kind in SCHEMA["$defs"].items():
        for rule in not_expressible(peft_type):
            assert NOT_EXPRESSIBLE[rule] in kind["description"], (peft_type, rule)


def test_published_schemas_are_valid_draft_2020_12() -> None:
    for path in sorted((Path(__file__).parent.parent / "schemas").glob("*.schema.json")):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text(encoding="utf-8")))
