"""The spec rules beyond one field's type, written as JSON Schema so the published schemas say what ``load_spec``
enforces (each rule is also checked in Python by the Struct's ``cross_field_problems`` for specs built in code).

A failing subschema carries ``x-error``: the one-line message ``load_spec`` reports at that field's JSON path.
Rules JSON Schema cannot state are listed in ``NOT_EXPRESSIBLE`` (they go into the schema's description and are
the only exclusions of the schema-vs-``load_spec`` agreement test).
"""

from __future__ import annotations

from peftdecl._json import JsonObject
from peftdecl.spec.limits import MAX_DIM, MAX_STEPS
from peftdecl.spec.lora_variants import BDLORA_OVERLAP, variant_schema_rules

_PROMPT_KINDS = ("PREFIX_TUNING", "PROMPT_TUNING")

REGEX_RULE = "regex"
"""String target_modules/exclude_modules, rank_pattern/alpha_pattern keys, layers_pattern and modules_to_save
entries must compile as Python regular expressions (JSON Schema's ``format: regex`` is ECMA-262 and not asserted)."""
IA3_SUBSET_RULE = "ia3_feedforward_subset"
"""IA3: a list ``feedforward_modules`` must be a subset of a list ``target_modules`` (no set relations)."""
ADALORA_SCHEDULE_RULE = "adalora_schedule"
"""AdaLoRA: ``tinit < total_step - tfinal`` (no arithmetic across fields)."""
BDLORA_OVERLAP_RULE = "bdlora_overlap"
"""LoRA: no pattern in both BD-LoRA lists (no set relations)."""
RESOURCE_RULE = "resource_limits"
"""Document size, nesting depth and value count (see peftdecl.spec.limits): not properties of single values."""

NOT_EXPRESSIBLE: dict[str, str] = {
    REGEX_RULE: "regex-valued fields must compile as Python regular expressions",
    IA3_SUBSET_RULE: "feedforward_modules must be a subset of target_modules when both are lists",
    ADALORA_SCHEDULE_RULE: "tinit must be < total_step - tfinal",
    BDLORA_OVERLAP_RULE: f"no {BDLORA_OVERLAP}",
    RESOURCE_RULE: "at most 1 MiB of text, 32 levels of nesting and 100,000 values",
}


def _present(name: str, schema: JsonObject) -> JsonObject:
    return {"required": [name], "properties": {name: schema}}


def _absent_or(name: str, schema: JsonObject) -> JsonObject:
    """The field is absent (so it takes its default) or matches ``schema``."""
    return {"anyOf": [{"not": {"required": [name]}}, {"properties": {name: schema}}]}


def _when(condition: JsonObject, then: JsonObject, otherwise: JsonObject | None = None) -> JsonObject:
    rule = {"if": condition, "then": then}
    if otherwise is not None:
        rule["else"] = otherwise
    return rule


def _must(name: str, schema: JsonObject, message: str) -> JsonObject:
    return {"properties": {name: {**schema, "x-error": message}}}


def _positive_count(maximum: int, required_error: str) -> JsonObject:
    """A required field holding an integer in [1, maximum]; ``required_error`` is the message when it is missing."""
    return {"type": "integer", "minimum": 1, "maximum": maximum, "x-required-error": required_error}


def _exactly_one_nonzero(
    first: str, second: str, first_default: int, second_default: int
) -> list[JsonObject]:
    """Exactly one of two non-negative integer fields is non-zero; errors are reported at ``first``."""
    message = f"exactly one of {first} and {second} must be non-zero (set the other to 0)"
    zero = {"const": 0}

    def is_zero(name: str, default: int) -> JsonObject:
        return _absent_or(name, zero) if default == 0 else _present(name, zero)

    second_zero = is_zero(second, second_default)
    return [
        # second is non-zero -> first must be zero; second is zero -> first must be non-zero
        _when(
            second_zero,
            _first_is(first, {"not": zero}, first_default != 0, message),
            _first_is(first, zero, first_default == 0, message),
        ),
    ]


def _first_is(name: str, schema: JsonObject, default_matches: bool, message: str) -> JsonObject:
    # when the default does not satisfy ``schema``, leaving the field out breaks the rule too
    if default_matches:
        return _must(name, schema, message)
    return {"required": [name], "properties": {name: {**schema, "x-error": message}}}


def _has_targeting_fields(peft_type: str) -> bool:
    """Whether the kind's spec has HF PEFT's layer-targeting fields (layers_to_transform and layers_pattern),
    read from its Struct in :mod:`peftdecl.kinds` so that a registered kind gets their rules too."""
    from peftdecl.kinds import spec_types

    cls = spec_types().get(peft_type)
    return cls is not None and {"layers_to_transform", "layers_pattern"} <= set(cls.__struct_fields__)


LORA_INIT_NAMES = ("gaussian", "pissa", "olora", "orthogonal", "eva", "lora_ga", "mica", "loftq", "corda")
"""The named values of init_lora_weights (besides true, false and pissa_niter_K)."""


def loftq_config_rule() -> JsonObject:
    """init_lora_weights 'loftq' needs loftq_config {loftq_bits: 4 or 8, loftq_iter: >= 1} (PEFT's LoftQConfig)."""
    config = {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {
            "loftq_bits": {"enum": [4, 8], "x-error": "must be 4 (NF4) or 8 (int8)"},
            "loftq_iter": {"type": "integer", "minimum": 1, "x-error": "must be a whole number >= 1"},
        },
    }
    message = "must be given with init_lora_weights 'loftq': {loftq_bits: 4 or 8, loftq_iter: >= 1}"
    then = {
        "required": ["loftq_config"],
        **_must("loftq_config", {**config, "x-required-error": message}, message),
    }
    return _when(_present("init_lora_weights", {"const": "loftq"}), then)


def kind_rules(peft_type: str) -> tuple[list[JsonObject], list[str], dict[str, JsonObject]]:
    """``(allOf rules, extra required fields, property overrides)`` for one adapter kind."""
    rules: list[JsonObject] = []
    required: list[str] = []
    overrides: dict[str, JsonObject] = {}
    if _has_targeting_fields(peft_type):
        regex_only = "cannot be used when target_modules is a regex string; use a list"
        rules.append(
            _when(
                _present("target_modules", {"type": "string"}),
                {
                    "properties": {
                        "layers_to_transform": {"type": "null", "x-error": regex_only},
                        "layers_pattern": {"type": "null", "x-error": regex_only},
                    }
                },
            )
        )
        rules.append(
            _when(
                {"not": _present("layers_to_transform", {"not": {"type": "null"}})},
                _must("layers_pattern", {"type": "null"}, "needs layers_to_transform to be set"),
            )
        )
    if peft_type in ("LORA", "ADALORA"):
        overrides["init_lora_weights"] = {
            "anyOf": [
                {"type": "boolean"},
                {"enum": list(LORA_INIT_NAMES)},
                {"type": "string", "pattern": "^pissa_niter_[0-9]+$"},
            ],
            "x-error": "must be true, false, 'gaussian', 'pissa', 'pissa_niter_K' (K a whole number), 'olora', "
            "'orthogonal', 'eva', 'lora_ga', 'mica', 'loftq' or 'corda'",
        }
        rules.append(loftq_config_rule())
        if peft_type == "LORA":
            rules.extend(variant_schema_rules())  # one of use_dora, velora_config, kasa_config, ... at a time
        rules.append(
            _when(
                _present("use_dora", {"const": True}),
                _must("lora_bias", {"const": False}, "cannot be combined with use_dora"),
            )
        )
        rules.append(
            _when(
                _present("init_lora_weights", {"type": "string"}),
                _must("lora_bias", {"const": False}, "needs init_lora_weights to be true or false"),
            )
        )
        rules.append(
            _when(
                _present("layer_replication", {"type": "array"}),
                _must(
                    "init_lora_weights",
                    {"not": {"type": "string", "pattern": "^(pissa|olora|corda|lora_ga|loftq)"}},
                    "rewrites the base weight, which the copies made by layer_replication share",
                ),
            )
        )
    if peft_type == "ADALORA":
        required.append("total_step")
        overrides["total_step"] = _positive_count(
            MAX_STEPS, "AdaLoRA needs total_step > 0 (the length of training)"
        )
    if peft_type == "OFT":
        rules.extend(_exactly_one_nonzero("r", "oft_block_size", 0, 32))
    if peft_type == "BOFT":
        rules.extend(_exactly_one_nonzero("boft_block_size", "boft_block_num", 4, 0))
    if peft_type in _PROMPT_KINDS:
        required.append("num_virtual_tokens")
        overrides["num_virtual_tokens"] = _positive_count(
            MAX_DIM, "is required (a positive number of virtual tokens)"
        )
    if peft_type == "PROMPT_TUNING":
        text_needed = "is required when prompt_tuning_init is 'TEXT'"
        nonempty = {"type": "string", "minLength": 1, "x-error": text_needed}
        rules.append(
            _when(
                _present("prompt_tuning_init", {"const": "TEXT"}),
                {
                    "required": ["prompt_tuning_init_text", "tokenizer_name_or_path"],
                    "properties": {"prompt_tuning_init_text": nonempty, "tokenizer_name_or_path": nonempty},
                    "x-error": text_needed,
                },
                _must(
                    "tokenizer_kwargs",
                    {"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}]},
                    "is only used when prompt_tuning_init is 'TEXT'",
                ),
            )
        )
    return rules, required, overrides


def not_expressible(peft_type: str) -> list[str]:
    """Names of the rules of ``peft_type`` that its JSON Schema cannot state."""
    names = [REGEX_RULE, RESOURCE_RULE]
    if peft_type == "IA3":
        names.append(IA3_SUBSET_RULE)
    if peft_type == "ADALORA":
        names.append(ADALORA_SCHEDULE_RULE)
    if peft_type == "LORA":
        names.append(BDLORA_OVERLAP_RULE)
    return names
