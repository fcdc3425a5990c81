"""What ``target_parameters`` (LoRA on raw parameters, HF PEFT's ``ParamWrapper``) cannot be combined with.

PEFT's wrapper adds ΔW to the parameter itself while the module runs, so there is no adapter input to drop out,
no output to add a bias to and no norm to decompose; it refuses these options, and so does peftdecl, up front.
"""

from __future__ import annotations

from typing import Any

PARAMETER_INITS = (True, False, "gaussian")
"""The ``init_lora_weights`` values peftdecl runs on a raw parameter."""
VARIANT_FIELDS = (
    "velora_config",
    "kasa_config",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "alora_invocation_tokens",
    "use_qalora",
)
"""LoraConfig fields that select a LoRA variant, which HF PEFT's ParamWrapper refuses (DoRA is checked apart)."""


def target_parameter_problems(spec: Any) -> list[tuple[str, str]]:
    """``(JSON path, message)`` for each option that cannot go with a non-empty ``target_parameters``."""
    if not getattr(spec, "target_parameters", None):
        return []
    why = "with target_parameters (HF PEFT's ParamWrapper refuses it too)"
    found = []
    if spec.lora_dropout:
        found.append(
            ("$.lora_dropout", f"must be 0 {why}: ΔW is added to the parameter, there is no input to drop")
        )
    if spec.fan_in_fan_out:
        found.append(("$.fan_in_fan_out", f"must be false {why}"))
    if spec.lora_bias:
        found.append(("$.lora_bias", f"must be false {why}"))
    if spec.use_dora:
        found.append(("$.use_dora", f"must be false {why}: LoRA variants do not run on raw parameters"))
    if spec.init_lora_weights not in PARAMETER_INITS:
        found.append(
            (
                "$.init_lora_weights",
                f"{spec.init_lora_weights!r} is not supported with target_parameters by peftdecl "
                "(supported there: true, false, 'gaussian')",
            )
        )
    for variant in VARIANT_FIELDS:  # PEFT's wrapper knows no LoRA variant
        if getattr(spec, variant, None):
            found.append((f"$.{variant}", f"cannot be set {why}: LoRA variants do not run on raw parameters"))
    return found
