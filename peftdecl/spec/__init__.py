"""Adapter specs: one frozen msgspec Struct per HF PEFT adapter kind, tagged by ``peft_type``."""

from __future__ import annotations

from peftdecl.spec._base import SpecBase
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl.spec.ia3 import IA3Spec
from peftdecl.spec.lora import LoraSpec
from peftdecl.spec.lycoris import LoHaSpec, LoKrSpec
from peftdecl.spec.oft import BOFTSpec, OFTSpec
from peftdecl.spec.prompt import PrefixTuningSpec, PromptTuningSpec
from peftdecl.spec.vera import VeraSpec

AdapterSpec = (
    LoraSpec
    | AdaLoraSpec
    | IA3Spec
    | LoHaSpec
    | LoKrSpec
    | OFTSpec
    | BOFTSpec
    | VeraSpec
    | PrefixTuningSpec
    | PromptTuningSpec
)
"""Any adapter spec; ``peft_type`` picks the member."""

SPEC_TYPES: dict[str, type[SpecBase]] = {
    cls.__struct_config__.tag: cls  # type: ignore[misc]
    for cls in (
        LoraSpec,
        AdaLoraSpec,
        IA3Spec,
        LoHaSpec,
        LoKrSpec,
        OFTSpec,
        BOFTSpec,
        VeraSpec,
        PrefixTuningSpec,
        PromptTuningSpec,
    )
}
"""peft_type -> Struct class, in HF PEFT's order."""

from peftdecl.spec.load import load_spec  # noqa: E402  (load needs SPEC_TYPES)

__all__ = [
    "SPEC_TYPES",
    "AdaLoraSpec",
    "AdapterSpec",
    "BOFTSpec",
    "IA3Spec",
    "LoHaSpec",
    "LoKrSpec",
    "LoraSpec",
    "OFTSpec",
    "PrefixTuningSpec",
    "PromptTuningSpec",
    "SpecBase",
    "VeraSpec",
    "load_spec",
]
