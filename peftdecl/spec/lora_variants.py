"""The sub-configs of four LoRA variants (HF PEFT 0.21's field names and defaults), and which execution kind a
LoRA spec runs as when one of them is set.

- ``velora_config`` (VeLoRA): the forward is LoRA's; the backward of A sees each input token compressed to one
  number per group of ``num_groups`` features, x_g ≈ (x_g · v) v · scale with v a unit vector (``init_type``).
- ``kasa_config`` (KaSA): W ← W minus its r smallest singular components; ΔW = s · B diag(d) A, d learnt.
- ``use_bdlora`` (BD-LoRA): A (or B) of the modules matched by ``target_modules_bd_a`` (``_bd_b``) is
  block-diagonal with ``nblocks`` blocks.
- ``monteclora_config`` (MonteCLoRA): in training A is perturbed by learnt Gaussian noise averaged over
  ``num_samples`` Monte Carlo samples with Dirichlet-distributed weights; a KL term regularises the noise.
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol

import msgspec
from msgspec import Meta

from peftdecl._json import JsonObject
from peftdecl.spec.limits import MAX_DIM, MAX_FINITE, MAX_RANK

NonNegative = Annotated[float, Meta(ge=0.0, le=MAX_FINITE)]
Positive = Annotated[float, Meta(gt=0.0, le=MAX_FINITE)]
FiniteFloat = Annotated[float, Meta(ge=-MAX_FINITE, le=MAX_FINITE)]


class _SubConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    """A nested config object: unknown fields are refused, every field is written."""


class VeloraConfig(_SubConfig, frozen=True):
    """VeLoRA: how the input of A is compressed for the backward pass."""

    num_groups: Annotated[
        int,
        Meta(
            ge=1, le=MAX_DIM, description="Feature groups per token; each keeps one number for the backward."
        ),
    ] = 64
    scale: Annotated[
        Positive, Meta(description="Factor on the reconstructed activations in A's gradient.")
    ] = 1.0
    init_type: Annotated[
        Literal["batch_average", "batch_average_once", "random"],
        Meta(
            description="The projection v: the normalised mean sub-token of every training batch ('batch_average'), "
            "of the first one ('batch_average_once'), or a random unit vector ('random')."
        ),
    ] = "batch_average"


class KasaConfig(_SubConfig, frozen=True):
    """KaSA: the weights of its two regularisers (AdaptedModel._get_kasa_loss, on torch)."""

    beta: Annotated[NonNegative, Meta(description="Weight of the L2 penalty Σ d².")] = 1e-4
    gamma: Annotated[
        NonNegative, Meta(description="Weight of the orthogonality penalty ‖BᵀB − I‖ + ‖AAᵀ − I‖.")
    ] = 1e-3


class BdLoraConfig(_SubConfig, frozen=True):
    """BD-LoRA: which modules get a block-diagonal A or B (a pattern matches when it is a substring of the name)."""

    target_modules_bd_a: Annotated[
        tuple[str, ...] | None, Meta(description="Modules whose A is block-diagonal (substring match).")
    ] = None
    target_modules_bd_b: Annotated[
        tuple[str, ...] | None, Meta(description="Modules whose B is block-diagonal (substring match).")
    ] = None
    nblocks: Annotated[int, Meta(ge=1, le=MAX_RANK, description="Blocks of each block-diagonal factor.")] = 1
    match_strict: Annotated[
        bool, Meta(description="Every target must match one of the two pattern lists.")
    ] = True


class MontecloraConfig(_SubConfig, frozen=True):
    """MonteCLoRA: the Monte Carlo perturbation of A during training and its regulariser."""

    num_samples: Annotated[int, Meta(ge=1, le=MAX_RANK, description="Monte Carlo samples per step.")] = 8
    use_entropy: Annotated[bool, Meta(description="Add Σ w² of the sample weights to the regulariser.")] = (
        False
    )
    dirichlet_prior: Annotated[
        Positive, Meta(description="Concentration of the Dirichlet prior of the sample weights.")
    ] = 0.1
    sample_scaler: Annotated[FiniteFloat, Meta(description="Factor on the sampled noise.")] = 1e-4
    kl_loss_weight: Annotated[FiniteFloat, Meta(description="Weight of the KL terms in the regulariser.")] = (
        1e-5
    )
    buffer_size: Annotated[
        int, Meta(ge=1, le=MAX_DIM, description="Noise draws HF PEFT pre-generates at a time.")
    ] = 150


VARIANT_FIELDS: dict[str, str] = {
    "velora_config": "velora",
    "kasa_config": "kasa",
    "use_bdlora": "bdlora",
    "monteclora_config": "monteclora",
}
"""LoRA field -> the execution kind it selects."""


class _VariantFields(Protocol):
    @property
    def velora_config(self) -> VeloraConfig | None: ...
    @property
    def kasa_config(self) -> KasaConfig | None: ...
    @property
    def use_bdlora(self) -> BdLoraConfig | None: ...
    @property
    def monteclora_config(self) -> MontecloraConfig | None: ...
    @property
    def use_dora(self) -> bool: ...


def variant_kind(spec: _VariantFields) -> str | None:
    """The execution kind of the first variant field set (None: none is); combinations are refused apart."""
    for name, kind in VARIANT_FIELDS.items():
        if getattr(spec, name) is not None:
            return kind
    return None


def variant_problems(spec: _VariantFields) -> list[tuple[str, str]]:
    """HF PEFT's rules: one LoRA variant at a time (DoRA included), and no module in both BD-LoRA lists."""
    found = []
    chosen = [name for name in VARIANT_FIELDS if getattr(spec, name) is not None]
    if spec.use_dora:
        chosen.insert(0, "use_dora")
    for name in chosen[1:]:
        found.append((f"$.{name}", f"cannot be combined with {chosen[0]} (one LoRA variant at a time)"))
    bd = spec.use_bdlora
    if bd is not None:
        both = sorted(set(bd.target_modules_bd_a or ()) & set(bd.target_modules_bd_b or ()))
        if both:
            found.append(
                (
                    "$.use_bdlora.target_modules_bd_b",
                    f"{both} are also in target_modules_bd_a; a pattern "
                    "makes either A or B block-diagonal, not both",
                )
            )
    return found


BDLORA_OVERLAP = "a pattern in both use_bdlora.target_modules_bd_a and target_modules_bd_b"
"""The one rule above JSON Schema cannot state (no set intersection); its schema description says so."""


def variant_schema_rules() -> list[JsonObject]:
    """:func:`variant_problems`'s one-variant rule in JSON Schema: once a variant field (use_dora first) is set,
    every later one must be null, the error at the later field."""
    fields = [("use_dora", {"const": True}), *((name, {"not": {"type": "null"}}) for name in VARIANT_FIELDS)]
    rules: list[JsonObject] = []
    for i, (earlier, is_set) in enumerate(fields):
        for later, _ in fields[i + 1 :]:
            unset = {"const": False} if later == "use_dora" else {"type": "null"}
            message = f"cannot be combined with {earlier} (one LoRA variant at a time)"
            rules.append(
                {
                    "if": {"required": [earlier], "properties": {earlier: is_set}},
                    "then": {"properties": {later: {**unset, "x-error": message}}},
                }
            )
    return rules
