"""Prefix tuning and prompt tuning: learned virtual tokens, as key/value prefixes or as input embeddings."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from peftdecl._json import JsonObject
from peftdecl.spec._base import PositiveInt, SpecBase

_AutoFilled = Meta(description="Filled from the model config when null.")


class _PromptLearningSpec(SpecBase, frozen=True):
    num_virtual_tokens: Annotated[
        PositiveInt | None, Meta(description="Number of virtual tokens (required).")
    ] = None
    token_dim: Annotated[PositiveInt | None, _AutoFilled] = None
    num_transformer_submodules: Annotated[
        Annotated[int, Meta(ge=1, le=2)] | None,
        Meta(description="1, or 2 for encoder-decoders; from the model when null."),
    ] = None
    num_attention_heads: Annotated[PositiveInt | None, _AutoFilled] = None
    num_layers: Annotated[PositiveInt | None, _AutoFilled] = None

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.num_virtual_tokens is None:
            return [("$.num_virtual_tokens", "is required (a positive number of virtual tokens)")]
        return []


class PrefixTuningSpec(_PromptLearningSpec, tag="PREFIX_TUNING", frozen=True):
    """Prefix tuning: per layer, T learned key and value vectors are prepended to attention."""

    init_weights: Annotated[Literal["zero"] | None, Meta(description="'zero' starts the prefix at zero.")] = (
        None
    )
    encoder_hidden_size: Annotated[
        PositiveInt | None, Meta(description="Hidden size of the projection MLP.")
    ] = None
    prefix_projection: Annotated[
        bool, Meta(description="Reparametrise the prefix through a two-layer MLP while training.")
    ] = False


class PromptTuningSpec(_PromptLearningSpec, tag="PROMPT_TUNING", frozen=True):
    """Prompt tuning: T learned embeddings are prepended to the input embeddings."""

    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: JsonObject | None = None

    def cross_field_problems(self) -> list[tuple[str, str]]:
        found = super().cross_field_problems()
        if self.prompt_tuning_init == "TEXT":
            if not self.prompt_tuning_init_text:
                found.append(("$.prompt_tuning_init_text", "is required when prompt_tuning_init is 'TEXT'"))
            if not self.tokenizer_name_or_path:
                found.append(("$.tokenizer_name_or_path", "is required when prompt_tuning_init is 'TEXT'"))
        elif self.tokenizer_kwargs:
            found.append(("$.tokenizer_kwargs", "is only used when prompt_tuning_init is 'TEXT'"))
        return found
