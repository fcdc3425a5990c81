"""HF PEFT's ``layer_replication``: before a LoRA adapter is attached, the model's decoder layers are rebuilt from
ranges of themselves (``[[0, 4], [2, 5]]``: layers 0, 1, 2, 3, 2, 3, 4), each copy sharing the base weights of the
layer it copies, so that every copy gets its own adapter.

A backend does it if its engine has ``replicate_layers(layer_map) -> ModelInfo`` (torch, MLX); the model's
inventory is taken again afterwards. Only the first adapter attached may ask for it, since it rebuilds the layer
list. Merging is refused on such a model: copies share one base weight, so each copy's update would reach every
copy (HF PEFT 0.21 merges anyway and changes the outputs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftdecl.errors import TargetError
from peftdecl.spec._base import SpecBase

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel
    from peftdecl.plan.ir import ModelInfo

MERGE_REFUSAL = (
    "cannot merge into a model whose layers were replicated (layer_replication): the copies share their base "
    "weights, so each copy's update would reach every copy"
)

NO_LAYER_LIST = {
    "numpy": "the NumPy reference works on a state dict, which has no decoder layer list to rebuild; attach the "
    "model itself on the torch or mlx backend, or pass the state dict of an already replicated model with "
    "layer_replication left out of the spec"
}
"""Why a backend without ``replicate_layers`` cannot have one, and what to use instead."""


def layer_map_problems(spec: SpecBase) -> list[tuple[str, str]]:
    """``layer_replication`` entries must be [start, end) ranges with start < end, and the list non-empty."""
    layer_map = getattr(spec, "layer_replication", None)
    if layer_map is None:
        return []
    if not layer_map:
        return [("$.layer_replication", "lists no layer range; use null or [[start, end], ...]")]
    found = [
        (f"$.layer_replication[{i}]", f"[{start}, {end}]: start must be below end")
        for i, (start, end) in enumerate(layer_map)
        if start >= end
    ]
    init = str(getattr(spec, "init_lora_weights", True))
    if init.startswith(BASE_WRITING_INITS):
        # each copy would write its own W − s·BA into the one weight the copies share
        found.append(
            (
                "$.init_lora_weights",
                f"{init!r} rewrites the base weight, which the copies made by layer_replication share; "
                "use another initialisation",
            )
        )
    return found


BASE_WRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
"""Initialisations that change the base weight per adapted layer (``pissa_niter_K`` included)."""


def replicated_info(model: AdaptedModel, spec: SpecBase) -> ModelInfo:
    """The model's inventory after ``spec``'s ``layer_replication`` (unchanged when it has none)."""
    layer_map = getattr(spec, "layer_replication", None)
    if not layer_map:
        return model.info
    replicate = getattr(model.engine, "replicate_layers", None)
    if replicate is None:
        why = NO_LAYER_LIST.get(model.backend.name, "its engine has no replicate_layers")
        raise TargetError(
            f"$.layer_replication: the {model.backend.name} backend does not replicate layers: {why}"
        )
    if model.adapters:
        raise TargetError(
            "$.layer_replication: only the first adapter attached may replicate layers (it rebuilds the model's "
            f"layer list); {', '.join(model.adapters)} already attached"
        )
    info: ModelInfo = replicate(tuple(tuple(entry) for entry in layer_map))
    return info
