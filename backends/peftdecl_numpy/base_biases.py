"""The base biases an adapter trains (HF PEFT's ``bias`` option) on the NumPy reference.

A layer's bias lives in its :class:`BaseLayer`; any other bias of the state dict (a LayerNorm's) is held here, so
that ``bias="all"`` saves and loads the same tensors as PEFT. Their gradient is dL/db = Σ dy over every axis but
the output features: every kind with a ``bias`` option adds b after its own transform.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import trainable_key
from peftdecl.bias_training import bias_module, trained_bias_keys
from peftdecl.errors import PeftdeclError
from peftdecl.plan import Plan
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array


class BaseBiases:
    """Live arrays of the base biases, by PEFT's keys (``<module>.base_layer.bias`` or ``<module>.bias``)."""

    def __init__(
        self, original: Mapping[str, Any], layers: Mapping[str, BaseLayer], asarray: Callable[[Any], Array]
    ) -> None:
        self._original, self._layers, self._asarray = original, layers, asarray
        self._other: dict[str, Array] = {}  # biases of modules the reference does not run (LayerNorm)

    def trained(self, plan: Plan) -> dict[str, Array]:
        """The biases ``plan`` trains, as live arrays (an optimiser may update them in place)."""
        keys = trained_bias_keys(plan, [k for k in self._original if "bias" in k])
        return {key: self._live(key) for key in keys}

    def load(self, biases: Mapping[str, np.ndarray]) -> None:
        """Replace each named bias by a saved one (shape checked)."""
        for key, value in biases.items():
            current = self._live(key)
            array = np.asarray(value)
            if array.shape != tuple(current.shape):
                raise PeftdeclError(
                    f"{key}: shape {list(array.shape)} does not fit the bias {list(current.shape)}"
                )
            layer = self._layers.get(bias_module(key))
            if layer is not None and layer.bias is not None:
                layer.bias = self._asarray(array)
            else:
                self._other[self._bare(key)] = self._asarray(array)

    def unloaded(self) -> dict[str, Array]:
        """The biases held here, by state-dict key (the layers' own are written with their weights)."""
        return dict(self._other)

    def gradients(self, book: AdapterBook, module: str, layer: BaseLayer, dy: Array) -> dict[str, Array]:
        """dL/db of ``module``'s bias, keyed for each active, trainable adapter that trains it."""
        if layer.bias is None:
            return {}
        grads = {}
        for name in book.trainable(book.active):
            plan = book.plans[name]
            for key in trained_bias_keys(plan, [f"{module}.bias"]):
                if any(lp.kind == "ia3" for _, lp in book.running_on(module)):
                    raise PeftdeclError(
                        f"{key}: the NumPy reference does not differentiate a trained base bias under IA³ "
                        "(which scales it)"
                    )
                grads[trainable_key(name, key, book.active)] = layer.bias_shape_sum(dy)
        return grads

    def _live(self, key: str) -> Array:
        layer = self._layers.get(bias_module(key))
        if key.endswith(".bias") and layer is not None and layer.bias is not None:
            return layer.bias
        bare = self._bare(key)
        if bare not in self._other:
            if bare not in self._original:
                raise PeftdeclError(f"{key}: the model has no such bias")
            self._other[bare] = self._asarray(self._original[bare])
        return self._other[bare]

    @staticmethod
    def _bare(key: str) -> str:
        module, _, leaf = key.rpartition(".")
        return f"{module.removesuffix('.base_layer')}.{leaf}"
