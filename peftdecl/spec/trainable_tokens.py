"""Trainable tokens: chosen rows of an embedding matrix are trained, the rest stays frozen.

y = E'[x] with E'[t] = d_t for each chosen token t (the stored ``trainable_tokens_delta`` holds the new rows
themselves, not a difference) and E'[i] = E[i] otherwise; on a linear layer (a tied output head) y = E' x.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Annotated

from msgspec import Meta

from peftdecl._json import JsonObject
from peftdecl.spec._base import SpecBase, TargetModules
from peftdecl.spec.limits import MAX_INT64

TokenIndex = Annotated[int, Meta(ge=0, le=MAX_INT64)]
"""A token id: a row of the embedding matrix (checked against the vocabulary when the plan is compiled)."""
TokenIndices = Annotated[
    tuple[TokenIndex, ...],
    Meta(description="Token ids whose embedding rows are trained (each at most once)."),
]


def token_list_problems(path: str, indices: Sequence[int]) -> list[tuple[str, str]]:
    """An empty list or a repeated token id (its row would be written twice, in no defined order)."""
    if not indices:
        return [(path, "needs at least one token index")]
    repeated = sorted(t for t, count in Counter(indices).items() if count > 1)
    if repeated:
        return [(path, f"token indices must be distinct; repeated: {repeated[:10]}")]
    return []


class TrainableTokensSpec(SpecBase, tag="TRAINABLE_TOKENS", frozen=True):
    """HF PEFT's ``TrainableTokensConfig``: new values for a few rows of an embedding, nothing else trains."""

    token_indices: TokenIndices = ()
    target_modules: Annotated[
        TargetModules,
        Meta(description="The embedding(s) to adapt; null: the model's input embeddings ('embed_tokens')."),
    ] = None
    init_weights: Annotated[
        bool,
        Meta(description="true: start from the rows' current values (a no-op); false: random N(0, 1) rows."),
    ] = True

    def to_dict(self) -> JsonObject:
        """Every field but ``modules_to_save``, which PEFT's TrainableTokensConfig lacks (it warns on the key)."""
        fields = super().to_dict()
        fields.pop("modules_to_save", None)
        return fields

    def cross_field_problems(self) -> list[tuple[str, str]]:
        found = token_list_problems("$.token_indices", self.token_indices)
        if self.modules_to_save is not None:
            found.append(("$.modules_to_save", "TRAINABLE_TOKENS has no modules_to_save; leave it null"))
        return found


TrainableTokenIndices = Annotated[
    TokenIndices | dict[str, TokenIndices] | None,
    Meta(
        description="Also train these rows of the input embeddings (a list of token ids), or of each named "
        "embedding ({module name: ids}); saved as '<module>.token_adapter.trainable_tokens_delta'."
    ),
]
"""LoRA's ``trainable_token_indices`` (HF PEFT's ``Optional[Union[list[int], dict[str, list[int]]]]``)."""


def trainable_token_problems(spec: SpecBase) -> list[tuple[str, str]]:
    """Problems of a LoRA-family spec's ``trainable_token_indices``: each id list non-empty and distinct."""
    wanted = getattr(spec, "trainable_token_indices", None)
    if wanted is None:
        return []
    if isinstance(wanted, dict):
        if not wanted:
            return [("$.trainable_token_indices", "names no embedding; use null or {name: [ids]}")]
        found = []
        for name, indices in wanted.items():
            found += token_list_problems(f"$.trainable_token_indices.{name}", indices)
        return found
    return token_list_problems("$.trainable_token_indices", wanted)
