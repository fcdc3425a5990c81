"""Which tensors of a saved adapter folder are not the adapter's own: base-weight overrides, modules_to_save
copies, and the embedding copies PEFT writes beside an adapter on an embedding-named layer."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from peftdecl.bias_training import is_bias_override
from peftdecl.plan import ModelInfo, Plan

EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def module_of(key: str, modules: Sequence[str]) -> str | None:
    """The module of ``modules`` that tensor ``key`` belongs to, or None."""
    for module in modules:
        if key.startswith(module + "."):
            return module
    return None


def is_base_override(info: ModelInfo, plan: Plan, key: str) -> bool:
    """True when ``key`` replaces a base tensor: ``*.base_layer.weight``, a saved embedding/output head, or a
    base bias the adapter trained (``bias`` other than "none")."""
    return (
        key.endswith(".base_layer.weight")
        or is_bias_override(plan, key)
        or (
            key.endswith(".weight")
            and key[: -len(".weight")] in (info.word_embeddings, info.output_head)
            and not module_of(key, plan.modules_to_save)
        )
    )


def embedding_copies(
    info: ModelInfo, plan: Plan, base_weight: Callable[[str], np.ndarray]
) -> dict[str, np.ndarray]:
    """The base weights PEFT saves beside an adapter that targets an embedding-named module: each targeted input
    or output embedding, as ``<module>.base_layer.weight``."""
    if not any(re.match(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$", m) for m in plan.targets):
        return {}
    if any(lp.kind == "trainable_tokens" for lp in plan.layers):
        return {}  # PEFT never saves the table beside trainable tokens: they exist to avoid that
    wanted = (info.word_embeddings, info.output_head)
    return {f"{m}.base_layer.weight": base_weight(m) for m in wanted if m is not None and m in plan.targets}
