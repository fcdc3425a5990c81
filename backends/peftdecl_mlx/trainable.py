"""Where the MLX engine's trainable tensors live: each one's ``trainable_parameters`` key
(:func:`peftdecl.backend.trainable_key`), its path in the model's tree and its current array."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import trainable_key
from peftdecl.plan.ir import ParamSpec
from peftdecl_mlx.base_biases import bias_trainables
from peftdecl_mlx.inventory import flatten
from peftdecl_mlx.kinds import prompt
from peftdecl_mlx.layer import AdaptedLayer, AdapterParams, SavedModule


class Trainable(NamedTuple):
    key: str
    """Its key in ``trainable_parameters(names)``."""
    path: str
    """Its dotted path in the model's parameter tree (``q_proj.adapters.default.lora_A.weight``)."""
    value: mx.array


def trainable_names(specs: Iterable[ParamSpec], trainable: bool) -> list[str]:
    """The names of the trainable tensors among ``specs``, or none when the adapter does not train."""
    return [p.name for p in specs if p.role == "trainable"] if trainable else []


def trainable_tensors(
    model: nn.Module,
    book: AdapterBook,
    layers: Mapping[str, AdaptedLayer],
    saved: Mapping[str, SavedModule],
    names: tuple[str, ...],
) -> Iterator[Trainable]:
    """Every trainable tensor of the adapters ``names`` that are not frozen, with their modules_to_save copies."""
    names = book.trainable(names)
    for name in names:
        plan = book.plans[name]
        for lp in plan.layers:
            tensors = layers[lp.module].adapters[name].tensors()
            for tensor in trainable_names(lp.params, True):
                path = f"{lp.module}.adapters.{name}.{tensor}"
                yield Trainable(trainable_key(name, lp.key(tensor), names), path, tensors[tensor])
        if plan.prompt is not None:
            encoder: AdapterParams = model[prompt.ENCODER][name]
            tensors = encoder.tensors()
            for tensor in trainable_names(plan.shared, True):
                path = f"{prompt.ENCODER}.{name}.{tensor}"
                yield Trainable(trainable_key(name, tensor, names), path, tensors[tensor])
        for module in plan.modules_to_save:
            for key, value in flatten(saved[module].copies[name].parameters()):
                path = f"{module}.copies.{name}.{key}"
                yield Trainable(trainable_key(name, f"{module}.{key}", names), path, value)
    for key, path, value in bias_trainables(model, book, names):
        yield Trainable(key, path, value)
