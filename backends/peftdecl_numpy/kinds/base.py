"""What every NumPy kind's ops share: the contract of :mod:`peftdecl.backend` (``KindOps`` with ``AdditiveOps`` or
``ComposingOps``, and ``ExplicitGradientOps``) derived from the few methods a kind writes itself.

An additive kind writes Δ(x) with its tape (``delta_record``), the tape's backward (``delta_backward``) and ΔW
(``delta_weight``); :class:`AdditiveKind` makes y = base(x) + Δ(x), its backward and the merge W ± ΔW from them.
A composing kind writes ``record``/``backward`` for the whole layer and the ``compose_output_record`` /
``compose_weight_record`` pair(s) with their backwards for the way it composes; :class:`ComposingKind` gives the
tape-free methods. Every method takes ``(lp, layer, p, ...)``: ``layer`` is the :class:`BaseLayer` handle, which
also carries the training flag and the engine's generator. A kind declared outside peftdecl can subclass these too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array

Params = Mapping[str, Array]
"""A layer's adapter tensors (or their gradients) by HF PEFT name, shared tensors included."""
Tape = dict[str, Any]
"""What a ``*_record`` keeps for its backward: each kind's own record of arrays, flags and nested tapes."""
MergeCache = dict[str, Array]
"""What a kind keeps from a merge for its unmerge (DoRA's weight norm), per adapter and layer."""
Weights = tuple[Array, Array | None]
"""(W, b): a layer's weight in the IR layout and its bias."""


class NumpyOps(Protocol):
    """What the engine calls on every NumPy kind's ops (the layer-level part of :mod:`peftdecl.backend`'s
    ``KindOps`` and ``ExplicitGradientOps``); :class:`AdditiveKind` and :class:`ComposingKind` provide it."""

    kind: str
    additive: bool

    def forward(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> Array: ...
    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array: ...
    def record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]: ...
    def backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array | None, Params]: ...
    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights: ...
    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights: ...


class NumpyAdditiveOps(NumpyOps, Protocol):
    """An additive kind's ops (``additive`` true): Δ(x) with its tape and backward."""

    def delta(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> Array: ...
    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]: ...
    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]: ...


class NumpyComposingOps(NumpyOps, Protocol):
    """A composing kind's ops (``additive`` false): the record/backward pair of its composition."""

    input_order: Literal["active", "reversed"]

    def composition(self, lp: LayerPlan) -> Literal["output", "input"]: ...
    def compose_output_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array, y: Array
    ) -> tuple[Array, Tape]: ...
    def compose_output_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array, Array | None, Params]: ...
    def compose_weight_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, weight: Array
    ) -> tuple[Array, Tape]: ...
    def compose_weight_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_weight: Array
    ) -> tuple[Array, Params]: ...


class _Kind(ABC):
    """What both families share: the layer output with its tape, its backward, and the output alone."""

    kind: str

    @abstractmethod
    def record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        """(y, the tape :meth:`backward` reads) with only this adapter running."""
        raise NotImplementedError

    @abstractmethod
    def backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array | None, Params]:
        """(dL/dx, dL/dp) from dL/dy."""
        raise NotImplementedError

    def forward(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> Array:
        return self.record(lp, layer, p, x)[0]


class AdditiveKind(_Kind):
    """y = base(x) + Δ(x); merged, W' = W + ΔW. A subclass writes the three abstract methods."""

    additive = True

    @abstractmethod
    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        """(Δ(x), the tape :meth:`delta_backward` reads)."""
        raise NotImplementedError

    @abstractmethod
    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        """(dL/dx through Δ only, dL/dp) from dL/dΔ."""
        raise NotImplementedError

    @abstractmethod
    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        raise NotImplementedError

    def delta(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> Array:
        return self.delta_record(lp, layer, p, x)[0]

    def record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        delta, tape = self.delta_record(lp, layer, p, x)
        return layer.forward(x) + delta, {"x": x, "delta": tape}

    def backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array | None, Params]:
        dx_delta, grads = self.delta_backward(lp, layer, p, tape["delta"], dy)
        dx = layer.input_grad(tape["x"], dy)
        if dx is None or dx_delta is None:
            return dx, grads
        return dx + dx_delta, grads

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        return layer.weight + self.delta_weight(lp, layer, p), layer.bias

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        return layer.weight - self.delta_weight(lp, layer, p), layer.bias


class ComposingKind(_Kind):
    """A kind that transforms the output built so far or the input the base reads (:mod:`peftdecl.composition`).
    A subclass writes the abstract methods and the ``compose_*_record``/``*_backward`` pair of its composition."""

    additive = False
    input_order: Literal["active", "reversed"] = "active"

    @abstractmethod
    def composition(self, lp: LayerPlan) -> Literal["output", "input"]:
        raise NotImplementedError

    @abstractmethod
    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        raise NotImplementedError

    @abstractmethod
    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        raise NotImplementedError

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        """W' − W: the change merging makes to the current base weight (for inspection)."""
        return self.merge(lp, layer, p, {})[0] - layer.weight

    def compose_output_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array, y: Array
    ) -> tuple[Array, Tape]:
        """(φ(x, y), tape) for an OUTPUT kind."""
        raise PeftdeclError(f"{lp.module}: {self.kind} composes on the input, not the output")

    def compose_output_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array, Array | None, Params]:
        """(dL/dy, dL/dx outside y, dL/dp) from dL/dφ."""
        raise PeftdeclError(f"{lp.module}: {self.kind} composes on the input, not the output")

    def compose_weight_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, weight: Array
    ) -> tuple[Array, Tape]:
        """(W Tᵀ, tape) for an INPUT kind with input transform T."""
        raise PeftdeclError(f"{lp.module}: {self.kind} composes on the output, not the input")

    def compose_weight_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_weight: Array
    ) -> tuple[Array, Params]:
        """(dL/dW, dL/dp) from dL/d(W Tᵀ)."""
        raise PeftdeclError(f"{lp.module}: {self.kind} composes on the output, not the input")

    def compose_output(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array, y: Array) -> Array:
        return self.compose_output_record(lp, layer, p, x, y)[0]

    def compose_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params, weight: Array) -> Array:
        return self.compose_weight_record(lp, layer, p, weight)[0]
