"""The kind-ops Protocols of :mod:`peftdecl.backend` as the MLX backend calls them: the layer handle is an
:class:`peftdecl_mlx.layer.AdaptedLayer` and every tensor an ``mx.array``.

The registry hands ops objects over untyped; :func:`peftdecl_mlx.kinds.ops_for` says they are :class:`MlxOps`, and
a caller that knows the kind's role (``additive``, :func:`peftdecl.composition.role`) narrows to
:class:`MlxAdditiveOps` or :class:`MlxComposingOps`. A kind need not subclass anything to provide them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, Protocol

import mlx.core as mx

from peftdecl.plan import LayerPlan

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer

Params = Mapping[str, mx.array]
"""A layer's adapter tensors by HF PEFT name (``lora_A.weight``), shared tensors included."""
MergeCache = dict[str, mx.array]
"""What a kind keeps from a merge for its unmerge (DoRA's weight norm), per adapter and layer."""
Weights = tuple[mx.array, mx.array | None]
"""(W, b): a layer's weight in the IR layout and its bias."""


class MlxOps(Protocol):
    """What every MLX kind's ops provide: :class:`peftdecl.backend.KindOps` on an AdaptedLayer."""

    kind: str
    additive: bool

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array: ...
    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array: ...
    def merge(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache) -> Weights: ...
    def unmerge(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache) -> Weights: ...


class MlxAdditiveOps(MlxOps, Protocol):
    """An additive kind (``additive`` true): y = base(x) + Δ(x)."""

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array: ...


class MlxComposingOps(MlxOps, Protocol):
    """A composing kind (``additive`` false): it maps the output so far (OUTPUT) or the base weight (INPUT)."""

    input_order: Literal["active", "reversed"]

    def composition(self, lp: LayerPlan) -> Literal["output", "input"]: ...
    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array, y: mx.array
    ) -> mx.array: ...
    def compose_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: mx.array) -> mx.array: ...
