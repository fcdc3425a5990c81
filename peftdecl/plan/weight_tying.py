"""HF PEFT's weight tying on tied input/output embeddings (``tie_word_embeddings``), at compile time.

Trainable tokens on the input embeddings reach every head tied to them (:func:`with_token_layers`). With
``ensure_weight_tying``, PEFT rewrites the spec: an embedding named in ``modules_to_save`` makes the tied heads use
the embeddings' trained copy (:func:`tie_modules_to_save`); the embeddings among ``target_modules`` give each tied
head a LoRA over the embeddings' own, A = B_embᵀ and B = A_embᵀ (:func:`tie_targets`, :func:`tie_lora_heads`). The
backend shares the tensors (``peftdecl_torch.tied``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from peftdecl.errors import TargetError
from peftdecl.plan.ir import LayerPlan, ModelInfo
from peftdecl.plan.kinds.trainable_tokens import lora_token_layers, tie_heads
from peftdecl.spec import patterns
from peftdecl.spec._base import SpecBase
from peftdecl.spec.trainable_tokens import TrainableTokensSpec

EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # HF PEFT's EMBEDDING_LAYER_NAMES (its tied-layer test)


def with_token_layers(spec: SpecBase, info: ModelInfo, layers: Sequence[LayerPlan]) -> list[LayerPlan]:
    """``layers`` with the trainable-token layers HF PEFT adds beside them: a LoRA-family spec's
    ``trainable_token_indices`` (:func:`lora_token_layers`), and for either, the heads tied to the input
    embeddings (:func:`tie_heads`); LoRA on a tied head is marked tied (:func:`tie_lora_heads`)."""
    if isinstance(spec, TrainableTokensSpec):
        return tie_heads(info, list(layers))
    return tie_lora_heads(spec, info, list(layers)) + lora_token_layers(spec, info, layers)


def embedding_in_targets(spec: SpecBase) -> bool:
    """HF PEFT's test for an embedding among ``target_modules`` (a list entry, or the regex, naming one)."""
    targets = getattr(spec, "target_modules", None)
    if isinstance(targets, str):
        return any(patterns.fullmatch(targets, name, "target_modules") for name in EMBEDDING_NAMES)
    return any(m.split(".")[-1] in EMBEDDING_NAMES for m in targets or ())


def tie_targets(spec: SpecBase, info: ModelInfo) -> SpecBase:
    """``ensure_weight_tying`` with an embedding among ``target_modules`` on tied weights (and none in
    modules_to_save), as HF PEFT: the input embeddings get LoRA and each tied head a LoRA tied to theirs
    (A_head = B_embᵀ, B_head = A_embᵀ, see :func:`tie_lora_heads`). A list becomes the entries that name no tied
    head, the embeddings' name, then the heads; a regex also matches the embeddings and the heads."""
    tied, embedding = info.tied_to_embeddings, info.word_embeddings
    if not getattr(spec, "ensure_weight_tying", False) or not tied or embedding is None:
        return spec
    if any(m.split(".")[-1] in EMBEDDING_NAMES for m in spec.modules_to_save or ()):
        return spec  # PEFT ties the saved copies instead (tie_modules_to_save)
    if not embedding_in_targets(spec):
        return spec
    targets = getattr(spec, "target_modules", None)
    if isinstance(targets, str):
        names = "|".join(f"^{re.escape(m)}$" for m in (embedding, *tied))
        return spec.replace(target_modules=f"(?:{targets}|{names})")
    kept = [
        m for m in targets or () if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", t) for t in tied)
    ]
    return spec.replace(target_modules=tuple(dict.fromkeys([*kept, embedding, *tied])))


def tie_lora_heads(spec: SpecBase, info: ModelInfo, layers: list[LayerPlan]) -> list[LayerPlan]:
    """Mark the LoRA layer of each head tied to the input embeddings (``tied_lora_to``) where ``tie_targets``
    added it: the backend makes its A and B the embeddings' Bᵀ and Aᵀ (one storage, as HF PEFT)."""
    embedding = info.word_embeddings
    if not getattr(spec, "ensure_weight_tying", False) or not any(lp.module == embedding for lp in layers):
        return layers
    if any(m.split(".")[-1] in EMBEDDING_NAMES for m in spec.modules_to_save or ()):
        return layers
    tied = set(info.tied_to_embeddings)
    other = [lp for lp in layers if lp.module in tied and lp.kind != "lora"]
    if other:
        raise TargetError(
            f"$.ensure_weight_tying: {other[0].module} ({other[0].kind}) can be tied to the embeddings as plain "
            "LoRA only"
        )
    return [
        dataclasses.replace(lp, options={**lp.options, "tied_lora_to": embedding})
        if lp.module in tied and lp.kind == "lora"
        else lp
        for lp in layers
    ]


def tie_specs(spec: SpecBase, info: ModelInfo) -> SpecBase:
    """The spec as HF PEFT rewrites it for ``ensure_weight_tying`` on tied weights (modules_to_save or targets)."""
    return tie_targets(tie_modules_to_save(spec, info), info)


def tie_modules_to_save(spec: SpecBase, info: ModelInfo) -> SpecBase:
    """``ensure_weight_tying`` with an embedding named in ``modules_to_save`` on tied weights, as HF PEFT: the input
    embeddings are trained in full and every head tied to them uses that copy. ``modules_to_save`` becomes the
    entries that name no tied head, the embeddings' name, then the tied heads (whose copies the backend ties)."""
    saved = list(spec.modules_to_save or ())
    tied = info.tied_to_embeddings
    if not getattr(spec, "ensure_weight_tying", False) or not tied or info.word_embeddings is None:
        return spec
    if not any(m.split(".")[-1] in EMBEDDING_NAMES for m in saved):
        return spec
    kept = [m for m in saved if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", t) for t in tied)]
    wanted = [*kept, info.word_embeddings, *tied]
    return spec.replace(modules_to_save=tuple(dict.fromkeys(wanted)))
