"""The frozen base layers of the NumPy reference: forward and gradients for every layer type in the IR.

Weights are held in the IR layout ``[out, in]`` whatever the state dict stores (GPT-2 ``Conv1D`` keeps
``[in, out]`` on disk and is transposed at the edge). Inputs: linear/gpt2_conv1d ``[..., in]``, embedding integer
indices ``[...]``, conv1d ``[N, C, L]``, conv2d ``[N, C, H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftdecl.plan import LayerInfo
from peftdecl_numpy.conv import conv_backward, conv_forward


@dataclass
class BaseLayer:
    """A frozen layer: y = f(x; W) + b."""

    info: LayerInfo
    weight: np.ndarray
    bias: np.ndarray | None = None
    merge_state: dict[int, Any] = field(default_factory=dict)
    """What a kind must remember between merge and unmerge (e.g. DoRA's weight norm), keyed by id(LayerPlan)."""
    unmerged: np.ndarray | None = None
    """The weight before the first of the merged adapters, kept while any is merged."""

    def unmerged_weight(self) -> np.ndarray:
        """The weight with no adapter merged in: what DoRA's norm is taken on when merging, as in HF PEFT."""
        return self.weight if self.unmerged is None else self.unmerged

    def forward(self, x: np.ndarray, weight: np.ndarray | None = None, with_bias: bool = True) -> np.ndarray:
        """The layer's output with ``weight`` (default: its own) in the IR layout."""
        w = self.weight if weight is None else weight
        kind = self.info.type
        if kind == "embedding":
            return w[x]
        if self.info.is_conv:
            y = conv_forward(x, w, self.info.stride, self.info.padding, self.info.dilation, self.info.groups)
            if with_bias and self.bias is not None:
                y = y + self.bias.reshape(1, -1, *(1,) * (y.ndim - 2))
            return y
        y = x @ w.T
        return y + self.bias if with_bias and self.bias is not None else y

    def input_grad(
        self, x: np.ndarray, dy: np.ndarray, weight: np.ndarray | None = None
    ) -> np.ndarray | None:
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

    def weight_grad(self, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """dL/dW in the IR layout (used where an adapter's gradient flows through a weight-like quantity)."""
        if self.info.type == "embedding":
            grad = np.zeros_like(self.weight)
            np.add.at(grad, x.reshape(-1), dy.reshape(-1, dy.shape[-1]))
            return grad
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
        return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    def bias_shape_sum(self, dy: np.ndarray) -> np.ndarray:
        """Σ dy over everything but the output-feature axis."""
        if self.info.is_conv:
            return dy.sum(axis=(0, *range(2, dy.ndim)))
        return dy.reshape(-1, dy.shape[-1]).sum(axis=0)


def dropout_mask(rng: np.random.Generator, shape: tuple[int, ...], p: float) -> np.ndarray | None:
    """Inverted-dropout multiplier (kept / (1 − p)), or None when p = 0."""
    if p <= 0.0:
        return None
    return (rng.random(shape) >= p) / (1.0 - p)
