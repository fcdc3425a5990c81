"""Adapter specs: one frozen msgspec Struct per HF PEFT adapter kind, tagged by ``peft_type``.

``SPEC_TYPES`` and ``AdapterSpec`` are read from the kind registry (:mod:`peftdecl.kinds`) on each access, so a
kind registered at runtime is part of both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftdecl.spec._base import SpecBase
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl.spec.ia3 import IA3Spec
from peftdecl.spec.lora import LoraSpec
from peftdecl.spec.lycoris import LoHaSpec, LoKrSpec
from peftdecl.spec.oft import BOFTSpec, OFTSpec
from peftdecl.spec.prompt import PrefixTuningSpec, PromptTuningSpec
from peftdecl.spec.vera import VeraSpec

if TYPE_CHECKING:
    from typing import TypeAlias

    AdapterSpec: TypeAlias = SpecBase
    """An adapter spec of whichever kind; ``peft_type`` picks the member."""
    SPEC_TYPES: dict[str, type[SpecBase]]
    """peft_type -> Struct class, in HF PEFT's order, then registered kinds."""


def spec_union() -> object:
    """The union of every registered spec Struct (msgspec decodes it by ``peft_type``), cached by registry
    version."""
    from typing import Union

    from peftdecl import kinds

    return kinds.cached("spec_union", lambda: Union[tuple(kinds.spec_types().values())])  # noqa: UP007


def __getattr__(name: str) -> object:
    # computed on access, so that kinds registered after this module was imported are included
    if name == "SPEC_TYPES":
        from peftdecl.kinds import spec_types

        return spec_types()
    if name == "AdapterSpec":
        return spec_union()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from peftdecl.spec.load import load_spec  # noqa: E402  (load imports SpecBase from here)

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
    "spec_union",
]
