"""HF PEFT's ``layer_replication`` on MLX: the decoder's layer list rebuilt from ranges of its layers, every copy
holding the very arrays of the layer it copies (so each copy can carry its own adapter on the same base weights).

``[[0, 4], [2, 5]]`` turns layers 0…4 into 0, 1, 2, 3, 2, 3, 4. The list is found where HF PEFT looks for it
(``model(.model)*.layers``, ``(.bert).encoder.layer`` or ``.h``), and the mlx-lm bookkeeping that describes the
layers follows the new list, so that ``make_cache``, attention masks and generation agree with it:

- layer counts (``num_hidden_layers``, ``num_layers``, ``n_layer``, ``n_layers``) on the model, its inner model and
  their ``args`` (and ``args.text_config``) become the new count, as PEFT sets ``config.num_hidden_layers``;
- per-layer lists named ``layer_types`` are re-indexed by the map: new entry j is old entry ``source[j]``;
- an inner model's ``*_idx`` integers (mlx-lm's ``fa_idx``, ``swa_idx``, …: the layer whose cache sets the mask)
  point at the first new layer of the same type (same ``layer_types`` entry, else a copy of that very layer);
- ``layer_idx`` attributes inside the copies are renumbered to their new position, as PEFT renumbers them.

A model that picks each layer's cache by its position (Gemma 3's sliding/global pattern) rather than by the layer
would give a copy the cache of another attention type: such a map is refused and the model left as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from peftdecl.errors import TargetError

COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
"""Attributes that hold the number of decoder layers."""
PER_LAYER_LISTS = ("layer_types",)
"""Attributes that hold one entry per decoder layer."""
BASE_WRITE_REFUSAL = (
    "cannot write base weights into a model whose layers were replicated (layer_replication): the copies share "
    "their base arrays, and an initialisation that changes W per copy (PiSSA, OLoRA, CorDA, LoftQ) or a saved base "
    "tensor would give each copy its own"
)
"""Why base weights are not written after replication (HF PEFT writes each copy's change into the shared one)."""
BIAS_REFUSAL = (
    "training base biases on a model whose layers were replicated (layer_replication) is not supported on MLX: "
    "HF PEFT trains one bias that the copies share, MLX would train one per copy; use bias='none'"
)
"""Why an adapter training base biases is not attached after replication (MLX arrays are values, not shared)."""


def layer_list(model: nn.Module) -> tuple[nn.Module, nn.Module, str, list[nn.Module]]:
    """(the inner model, the module holding the decoder layers, that key, the layer list), found as PEFT does."""
    while isinstance(model.get("model"), nn.Module):
        model = model["model"]
    if isinstance(model.get("bert"), nn.Module):
        model = model["bert"]
    for owner_key, key in (("", "layers"), ("encoder", "layer"), ("", "h")):
        owner = model.get(owner_key) if owner_key else model
        found = owner.get(key) if isinstance(owner, nn.Module) else None
        if isinstance(found, list) and found and all(isinstance(layer, nn.Module) for layer in found):
            assert isinstance(owner, nn.Module)  # found is only set on a module
            return model, owner, key, found
    raise TargetError(
        "$.layer_replication: found no layer list (model.layers, encoder.layer or h) in "
        f"{type(model).__name__}; HF PEFT replicates Llama-, BERT- and Falcon-like models only"
    )


def arrays_of(module: nn.Module) -> list[mx.array]:
    """Every array ``module``'s tree holds, parameters and underscored state (rotary tables, …) alike."""
    found: list[mx.array] = []

    def visit(node: object) -> None:
        if isinstance(node, mx.array):
            found.append(node)
        elif isinstance(node, dict):  # an nn.Module is a dict too
            for value in node.values():
                visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(module)
    return found


def shared_copy(layer: nn.Module, keep: Sequence[object] = ()) -> nn.Module:
    """A copy of ``layer`` whose modules are new and whose arrays (and the ``keep`` objects) are the originals."""
    memo: dict[int, Any] = {id(a): a for a in arrays_of(layer)}
    memo.update({id(obj): obj for obj in keep})
    clone: nn.Module = copy.deepcopy(layer, memo)
    return clone


def config_objects(model: nn.Module, inner: nn.Module) -> list[object]:
    """The mlx-lm ``args`` objects of the model and its inner model (and a ``text_config`` inside them)."""
    found: list[object] = []
    for holder in (model, inner):
        args = getattr(holder, "args", None)
        for obj in (args, getattr(args, "text_config", None)):
            if obj is not None and not isinstance(obj, dict) and all(obj is not f for f in found):
                found.append(obj)
    return found


def replicate_layers(model: nn.Module, layer_map: Sequence[tuple[int, int]]) -> int:
    """Rebuild the layer list from ``layer_map`` ([start, end) ranges of the current layers) and the bookkeeping
    that describes it; returns the new number of layers."""
    inner, owner, key, layers = layer_list(model)
    for i, (start, end) in enumerate(layer_map):
        if not 0 <= start < end <= len(layers):
            raise TargetError(
                f"$.layer_replication[{i}]: [{start}, {end}] is not a range of the model's {len(layers)} layers"
            )
    sources = [i for start, end in layer_map for i in range(start, end)]
    configs = config_objects(model, inner)
    holders = unique([model, inner, owner, *configs])
    before = cache_kinds(model)
    undo = [
        (h, name, getattr(h, name))
        for h in holders
        for name in (*COUNTS, *PER_LAYER_LISTS)
        if hasattr(h, name)
    ]
    undo += [(inner, name, value) for name, value in index_attributes(inner)]
    old_types = next(
        (list(t) for h in holders if isinstance(t := getattr(h, "layer_types", None), list)), None
    )
    new_indices = {name: repointed(value, sources, old_types) for name, value in index_attributes(inner)}
    new_layers = []
    for position, source in enumerate(sources):
        clone = shared_copy(layers[source], keep=configs)
        for _, sub in clone.named_modules():
            if isinstance(getattr(sub, "layer_idx", None), int):  # some models read it in their forward
                sub.layer_idx = position
        new_layers.append(clone)
    owner[key] = new_layers
    for holder in holders:
        for name in COUNTS:
            if isinstance(getattr(holder, name, None), int):
                setattr(holder, name, len(new_layers))
        for name in PER_LAYER_LISTS:
            entries = getattr(holder, name, None)
            if isinstance(entries, list) and len(entries) == len(layers):
                setattr(holder, name, [entries[s] for s in sources])
    for name, value in new_indices.items():
        setattr(inner, name, value)
    after = cache_kinds(model)
    if before is not None and after is not None and after != [before[s] for s in sources]:
        owner[key] = layers  # the originals were never changed: put the model back as it was
        for holder, name, value in undo:
            setattr(holder, name, value)
        raise TargetError(
            f"$.layer_replication: {type(model).__name__} picks each layer's cache by its position ("
            f"{', '.join(after)}), not by the layer it copies ({', '.join(before[s] for s in sources)}); "
            "only maps that keep every position's attention type work on this model"
        )
    return len(new_layers)


def cache_kinds(model: nn.Module) -> list[str] | None:
    """The kind of cache mlx-lm's ``make_cache`` gives each layer (``RotatingKVCache(3)``); None without one."""
    make_cache = getattr(model, "make_cache", None)
    if make_cache is None:
        return None
    return [f"{type(c).__name__}({getattr(c, 'max_size', '')})" for c in make_cache()]


def unique(objects: Sequence[object]) -> list[object]:
    """``objects`` without repeats (by identity: modules are unhashable dicts), in order."""
    kept: list[object] = []
    for obj in objects:
        if all(obj is not k for k in kept):
            kept.append(obj)
    return kept


def index_attributes(inner: nn.Module) -> list[tuple[str, int]]:
    """The inner model's ``*_idx`` integers (mlx-lm's ``fa_idx``, ``swa_idx``: a layer picked for its type)."""
    return [
        (name, value)
        for name, value in vars(inner).items()
        if name.endswith("_idx") and isinstance(value, int) and not isinstance(value, bool)
    ]


def repointed(old: int, sources: Sequence[int], old_types: Sequence[object] | None) -> int | None:
    """The first new layer standing for old layer ``old``: one of its type (by ``old_types``), else a copy of it;
    None when no such layer is left (mlx-lm's value for a type the model lacks)."""
    for position, source in enumerate(sources):
        if old_types is not None and 0 <= old < len(old_types):
            if old_types[source] == old_types[old]:
                return position
        elif source == old:
            return position
    return None
