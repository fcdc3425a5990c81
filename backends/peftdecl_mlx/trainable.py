"""Where the MLX engine's trainable tensors live: each one's ``trainable_parameters`` key
(:func:`peftdecl.backend.trainable_key`), its path in the model's tree and its current array."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import trainable_key
from peftdecl.errors import PeftdeclError
from peftdecl.plan.ir import ParamSpec
from peftdecl_mlx.base_biases import bias_trainables
from peftdecl_mlx.inventory import ParameterTree, flatten
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


class TrainableTree:
    """The engine's trainable tensors as a flat mapping and as the model's tree, mixed into
    :class:`~peftdecl_mlx.engine.MlxEngine` (which holds the model, the book and the wrappers)."""

    _model: nn.Module
    _book: AdapterBook
    _layers: dict[str, AdaptedLayer]
    _saved: dict[str, SavedModule]

    def trainable_parameters(self, names: tuple[str, ...]) -> dict[str, mx.array]:
        """Key -> the current array of every trainable tensor of adapters ``names`` (frozen ones left out) and of
        their modules_to_save copies, keyed as on every backend (:func:`peftdecl.backend.trainable_key`).

        MLX arrays are values: an optimizer step puts new arrays into the model and leaves this mapping behind.
        Either train the model's tree (``nn.value_and_grad(engine.model, f)`` then
        ``optimizer.update(engine.model, grads)``; :meth:`parameter_tree` is that tree) and call this again
        afterwards, or train this flat mapping (``optimizer.apply_gradients(grads, params)`` accepts it) and
        write it back with :meth:`update_parameters`."""
        return {key: value for key, _, value in self._trainable(names)}

    def parameter_tree(self, names: tuple[str, ...] | None = None) -> ParameterTree:
        """The model's tree of the trainable arrays of ``names`` (default: the active adapters that are not
        frozen), nested as ``engine.model`` holds them: what ``nn.value_and_grad(engine.model, f)`` returns
        gradients for and ``optimizer.update(engine.model, grads)`` updates."""
        tree: ParameterTree = tree_unflatten(
            [(path, v) for _, path, v in self._trainable(self._names(names))]
        )
        return tree

    def update_parameters(self, params: Mapping[str, mx.array], names: tuple[str, ...] | None = None) -> None:
        """Write ``params`` into the model, keyed as :meth:`trainable_parameters` returns them for ``names``
        (default: the active adapters that are not frozen); unknown keys are refused, naming them."""
        paths = {key: path for key, path, _ in self._trainable(self._names(names))}
        unknown = sorted(set(params) - set(paths))
        if unknown:
            raise PeftdeclError(
                f"update_parameters: unknown keys {unknown[:5]}; expected keys like {list(paths)[:3]}"
            )
        self._model.update(tree_unflatten([(paths[k], v) for k, v in params.items()]))

    def _names(self, names: tuple[str, ...] | None) -> tuple[str, ...]:
        return self._book.trainable(self._book.active if names is None else names)

    def _trainable(self, names: tuple[str, ...]) -> Iterator[Trainable]:
        return trainable_tensors(self._model, self._book, self._layers, self._saved, names)
