"""The base biases an adapter trains (HF PEFT's ``bias`` option) in an MLX model, by PEFT's key names.

A key is ``<module>.base_layer.bias`` for a wrapped layer and ``<module>.bias`` otherwise; MLX's quantised layers
also hold ``biases`` (their quantisation offsets), which are not biases of the model and are never trained.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import trainable_key
from peftdecl.bias_training import BASE_LAYER, bias_mode, trained_bias_keys
from peftdecl.errors import PeftdeclError
from peftdecl_mlx.inventory import flatten, get_module

_ADAPTER_PARTS = (".adapters.", ".copies.", ".original.")


def base_bias_paths(model: nn.Module) -> dict[str, str]:
    """Every base bias of ``model``: its unwrapped name (``a.bias``) -> its path in the tree now."""
    found = {}
    for path, _ in flatten(model.parameters()):
        leaf = path.rpartition(".")[2]
        if "bias" not in leaf or leaf == "biases" or any(part in f".{path}" for part in _ADAPTER_PARTS):
            continue
        found[path.replace(BASE_LAYER + ".", ".")] = path
    return found


def _path(paths: Mapping[str, str], key: str) -> str:
    module, _, leaf = key.rpartition(".")
    bare = f"{module.removesuffix(BASE_LAYER)}.{leaf}"
    if bare not in paths:
        raise PeftdeclError(f"{key}: the model has no such bias parameter")
    return paths[bare]


def trained_biases(
    model: nn.Module, book: AdapterBook, names: tuple[str, ...]
) -> Iterator[tuple[str, str, str]]:
    """(adapter, key, tree path) of each base bias the adapters ``names`` train."""
    paths = base_bias_paths(model)
    for name in names:
        for key in trained_bias_keys(book.plans[name], paths):
            yield name, key, _path(paths, key)


def bias_values(model: nn.Module, book: AdapterBook, name: str) -> dict[str, mx.array]:
    """Key -> current value of the biases adapter ``name`` trains."""
    values = dict(flatten(model.parameters()))
    return {key: values[path] for _, key, path in trained_biases(model, book, (name,))}


def bias_trainables(
    model: nn.Module, book: AdapterBook, names: tuple[str, ...]
) -> Iterator[tuple[str, str, mx.array]]:
    """(trainable key, tree path, value) of the biases the adapters ``names`` train."""
    values = dict(flatten(model.parameters()))
    for name, key, path in trained_biases(model, book, names):
        yield trainable_key(name, key, names), path, values[path]


def write_biases(model: nn.Module, biases: Mapping[str, np.ndarray]) -> None:
    """Replace each named bias by a saved one (shape checked), in the bias's own dtype."""
    if not biases:
        return
    paths, values = base_bias_paths(model), dict(flatten(model.parameters()))
    updates = []
    for key, value in biases.items():
        path = _path(paths, key)
        array = np.asarray(value)
        if array.shape != tuple(values[path].shape):
            raise PeftdeclError(
                f"{key}: shape {list(array.shape)} does not fit the bias {list(values[path].shape)}"
            )
        updates.append((path, mx.array(array, dtype=values[path].dtype)))
    model.update(tree_unflatten(updates))


def set_bias_trainability(model: nn.Module, book: AdapterBook) -> None:
    """Unfreeze the biases trained by active, trainable adapters; keep every other base bias frozen."""
    trainable = book.trainable(book.active)
    wanted = {path for _, _, path in trained_biases(model, book, tuple(trainable))}
    for name in book.plans:
        if bias_mode(book.plans[name]) == "none":
            continue
        for _, _, path in trained_biases(model, book, (name,)):
            owner, _, leaf = path.rpartition(".")
            module = get_module(model, owner)
            if path in wanted:
                module.unfreeze(keys=[leaf], recurse=False)
            else:
                module.freeze(keys=[leaf], recurse=False)
