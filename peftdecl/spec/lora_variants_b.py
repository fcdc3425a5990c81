"""LoRA variants that HF PEFT 0.21 selects from LoraConfig values.

- MiCA (``init_lora_weights="mica"``): its own execution kind sharing LoRA's ``peft_type``; :func:`variant_b_kind`
  picks it as PEFT picks its layer variant, and :func:`variant_b_problems` refuses what PEFT has no variant for
  (two variants at a time).
- aLoRA (``alora_invocation_tokens``): its own execution kind too, LoRA acting from the invocation tokens on.
- QA-LoRA (``use_qalora``): accepted as PEFT takes it on the layers peftdecl runs, i.e. plain LoRA (QALORA_HELP).
"""

from __future__ import annotations

from typing import Annotated, Protocol

import msgspec
from msgspec import Meta

from peftdecl.spec.limits import MAX_DIM, MAX_FINITE


class ArrowConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    """HF PEFT's ``ArrowConfig``: route each token among the top-k of a library of LoRA experts (Arrow), optionally
    after subtracting the mean of general adapters from each expert (GenKnowSub)."""

    top_k: Annotated[int, Meta(ge=1, le=MAX_DIM, description="Experts mixed per token.")] = 3
    router_temperature: Annotated[
        float, Meta(gt=0.0, le=MAX_FINITE, description="Softmax temperature of the expert coefficients.")
    ] = 1.0
    use_gks: Annotated[bool, Meta(description="GenKnowSub: subtract the general adapters' mean A and B.")] = (
        False
    )
    task_adapter_names: Annotated[
        tuple[str, ...] | None, Meta(description="The experts, in order (create_arrow_model sets them).")
    ] = None
    gks_adapter_names: Annotated[
        tuple[str, ...] | None,
        Meta(description="GenKnowSub's general adapters (create_arrow_model sets them)."),
    ] = None
    rng_seed: Annotated[
        int | None, Meta(description="Seed of PEFT's power iteration; peftdecl's prototypes are exact SVDs.")
    ] = None


class _VariantFields(Protocol):
    @property
    def init_lora_weights(self) -> bool | str: ...
    @property
    def use_dora(self) -> bool: ...
    @property
    def alora_invocation_tokens(self) -> tuple[int, ...] | None: ...
    @property
    def arrow_config(self) -> ArrowConfig | None: ...


VARIANT_B_ACCEPTED = ("use_qalora", "alora_invocation_tokens", "arrow_config")
"""LoraConfig fields of this module that LoraSpec accepts beyond their defaults."""

QALORA_HELP = (
    "QA-LoRA: HF PEFT 0.21 applies it on GPTQ-quantised layers only (the adapter input average-pooled over "
    "qalora_group_size features), which peftdecl does not run; on every other layer PEFT, and so peftdecl, "
    "trains plain LoRA and keeps the flag in the saved config."
)

VARIANT_B_FIELDS = {"mica": "init_lora_weights", "alora": "alora_invocation_tokens", "arrow": "arrow_config"}
"""Execution kind -> the LoraConfig field that requests it."""


def requested_variants(spec: _VariantFields) -> list[str]:
    """The kinds of this module the spec requests: ``mica`` when init_lora_weights is "mica", ``alora`` when
    alora_invocation_tokens is a non-empty list (PEFT reads an empty one as plain LoRA)."""
    found = ["mica"] if spec.init_lora_weights == "mica" else []
    found += ["alora"] if spec.alora_invocation_tokens else []
    return [*found, "arrow"] if spec.arrow_config is not None else found


def variant_b_kind(spec: _VariantFields) -> str | None:
    """The execution kind of the one variant of this module the spec requests, or None (another kind)."""
    found = requested_variants(spec)
    return found[0] if len(found) == 1 else None


def variant_b_problems(spec: _VariantFields) -> list[tuple[str, str]]:
    """HF PEFT has a layer variant for each of these alone and none for two together (DoRA and the variants of
    :mod:`peftdecl.spec.lora_variants` included): every requested one after the first is refused."""
    from peftdecl.spec.lora_variants import VARIANT_FIELDS as OTHER_FIELDS

    mine = [VARIANT_B_FIELDS[name] for name in requested_variants(spec)]
    others = [name for name in OTHER_FIELDS if getattr(spec, name, None) is not None]
    first = "use_dora" if spec.use_dora else (others[0] if others else None)
    if first is None and mine:
        first = mine.pop(0)
    return [(f"$.{name}", f"cannot be combined with {first} (one LoRA variant at a time)") for name in mine]
