"""The frozen base layers of the NumPy reference: forward and gradients for every layer type in the IR.

Weights are held in the IR layout ``[out, in]`` whatever the state dict stores (GPT-2 ``Conv1D`` keeps
``[in, out]`` on disk and is transposed at the edge). Inputs: linear/gpt2_conv1d ``[..., in]``, embedding integer
indices ``[...]``, conv1d ``[N, C, L]``, conv2d ``[N, C, H, W]``, conv3d ``[N, C, D, H, W]``. Arrays belong to the
engine's namespace ``xp``.

A :class:`BaseLayer` is the handle every kind's ops receive: besides the base weights it carries the engine's
:class:`Mode` (training flag and generator), so that dropout draws come from the engine's one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from peftdecl.plan import LayerInfo
from peftdecl_numpy.conv import conv_backward, conv_forward
from peftdecl_numpy.xp_ops import Array, Namespace, add_at_rows, namespace, take_rows


@dataclass
class Mode:
    """What every layer of one engine shares: training or not, and the generator random draws come from.

    Draws are made on the host by NumPy's generator and moved to the layer's namespace, so a run gives the same
    numbers on every namespace."""

    training: bool = False
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))


class ModeView:
    """Reads an engine's shared :class:`Mode`: the engine itself and each of its layers are such views."""

    mode: Mode

    @property
    def training(self) -> bool:
        return self.mode.training

    @property
    def rng(self) -> np.random.Generator:
        """The engine's generator: every dropout mask and random block choice is drawn from it."""
        return self.mode.rng

    @rng.setter
    def rng(self, generator: np.random.Generator) -> None:
        self.mode.rng = generator


@dataclass
class BaseLayer(ModeView):
    """A frozen layer: y = f(x; W) + b."""

    info: LayerInfo
    weight: Array
    bias: Array | None = None
    mode: Mode = field(default_factory=Mode)
    unmerged: Array | None = None
    """The weight before the first of the merged adapters, kept while any is merged."""

    @property
    def xp(self) -> Namespace:
        return namespace(self.weight)

    def unmerged_weight(self) -> Array:
        """The weight with no adapter merged in: what DoRA's norm is taken on when merging, as in HF PEFT."""
        return self.weight if self.unmerged is None else self.unmerged

    def host(self, value: np.ndarray | float) -> Array:
        """A host value as an array of the layer's namespace and dtype."""
        return self.xp.asarray(value, dtype=self.weight.dtype)

    def forward(self, x: Array, weight: Array | None = None, with_bias: bool = True) -> Array:
        """The layer's output with ``weight`` (default: its own) in the IR layout."""
        w = self.weight if weight is None else weight
        kind = self.info.type
        if kind == "embedding":
            return take_rows(w, x)
        if self.info.is_conv:
            y = conv_forward(x, w, self.info.stride, self.info.padding, self.info.dilation, self.info.groups)
            if with_bias and self.bias is not None:
                y = y + self.xp.reshape(self.bias, (1, -1, *(1,) * (y.ndim - 2)))
            return y
        y = x @ w.T
        return y + self.bias if with_bias and self.bias is not None else y

    def input_grad(self, x: Array, dy: Array, weight: Array | None = None) -> Array | None:
        """dL/dx (None for an embedding, whose input is integer indices)."""
        w = self.weight if weight is None else weight
        if self.info.type == "embedding":
            return None
        if self.info.is_conv:
            dx, _ = conv_backward(
                x, w, dy, self.info.stride, self.info.padding, self.info.dilation, self.info.groups
            )
            return dx
        return dy @ w

    def weight_grad(self, x: Array, dy: Array, weight: Array | None = None) -> Array:
        """dL/dW in the IR layout (used where an adapter's gradient flows through a weight-like quantity);
        ``weight``, the weight the forward ran with, matters only to layers not linear in it (attention)."""
        xp = self.xp
        if self.info.type == "embedding":
            return add_at_rows(xp.zeros_like(self.weight), x, dy)
        if self.info.is_conv:
            _, dw = conv_backward(
                x,
                self.weight,
                dy,
                self.info.stride,
                self.info.padding,
                self.info.dilation,
                self.info.groups,
                False,
            )
            return dw
        return rows(dy).T @ rows(x)

    def bias_shape_sum(self, dy: Array) -> Array:
        """Σ dy over everything but the output-feature axis."""
        if self.info.is_conv:
            return self.xp.sum(dy, axis=(0, *range(2, dy.ndim)))
        return self.xp.sum(rows(dy), axis=0)


def rows(t: Array) -> Array:
    """``t`` as a matrix [everything else, last axis]."""
    return namespace(t).reshape(t, (-1, t.shape[-1]))


def dropout_mask(layer: BaseLayer, shape: tuple[int, ...], p: float) -> Array | None:
    """Inverted-dropout multiplier (kept / (1 − p)) in training, or None (evaluation, or p = 0)."""
    if not layer.training or p <= 0.0:
        return None
    return layer.host((layer.rng.random(shape) >= p) / (1.0 - p))
