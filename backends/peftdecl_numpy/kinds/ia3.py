"""IA3 (Liu et al., 2022): y = l ⊙ (W x + b) for attention layers, y = W (l ⊙ x) + b for feed-forward ones.

The bias is scaled too in the first form, as in HF PEFT. Merge folds l into the weight: W' = diag(l) W with
b' = l ⊙ b (rows), or W' = W diag(l) (columns; per input channel of each group for a grouped convolution).
Unmerge divides by l + 1e-8 exactly as HF PEFT does, so it is inexact (relative error ≈ 1e-8 / |l|) and loses
the weights wherever l ≈ 0. IA3 has no dropout. Several active adapters multiply their vectors, as in HF PEFT:
each scales the input (feed-forward) or the output built so far. HF PEFT's layer keeps the feed-forward flag of
its first adapter for all of them, so it never mixes the two forms on one layer; here each adapter keeps its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl.composition import INPUT, OUTPUT
from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.layers import BaseLayer

Params = dict[str, np.ndarray]
LAYER_TYPES = ("linear", "conv2d", "gpt2_conv1d")
UNMERGE_EPS = 1e-8  # HF PEFT's guard against division by zero


def _on_features(lp: LayerPlan, l_vec: np.ndarray) -> np.ndarray:
    # the stored (1, C, 1, 1) already broadcasts over [N, C, H, W]; linear vectors act on the last axis
    return l_vec if lp.layer.is_conv else l_vec.reshape(-1)


def _sum_to(lp: LayerPlan, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if lp.layer.is_conv:
        return t.sum(axis=(0, *range(2, t.ndim))).reshape(shape)
    return t.reshape(-1, t.shape[-1]).sum(axis=0).reshape(shape)


class IA3Ops:
    kind = "ia3"
    # several active IA3 adapters multiply their vectors in HF PEFT; they are not summed contributions
    additive = False
    input_order = "active"  # diagonal scalings commute: any order gives the same product

    def composition(self, lp: LayerPlan) -> str:
        """A feed-forward vector scales the input the base reads, any other the output built so far."""
        return INPUT if lp.options["feedforward"] else OUTPUT

    def forward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if lp.options["feedforward"]:
            return base.forward(x * _on_features(lp, p["ia3_l"])), {"x": x}
        return self.output_map(lp, base, p, x, base.forward(x), ctx)

    def backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray | None, Params]:
        l_vec, x = p["ia3_l"], cache["x"]
        scale = _on_features(lp, l_vec)
        if lp.options["feedforward"]:
            dh = base.input_grad(x * scale, dy)
            assert dh is not None
            return dh * scale, {"ia3_l": _sum_to(lp, dh * x, l_vec.shape)}
        dy_in, _, grads = self.output_map_backward(lp, base, p, cache, dy)
        return base.input_grad(x, dy_in), grads

    def output_map(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, y: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """y' = l ⊙ y: the output so far (bias included) scaled per output feature."""
        return y * _on_features(lp, p["ia3_l"]), {"x": x, "y": y}

    def output_map_backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray, None, Params]:
        l_vec = p["ia3_l"]
        return dy * _on_features(lp, l_vec), None, {"ia3_l": _sum_to(lp, dy * cache["y"], l_vec.shape)}

    def weight_map(
        self, lp: LayerPlan, base: BaseLayer, p: Params, w: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """W' = W diag(l): the input scaled per input feature (per input channel of each group)."""
        return w * self._weight_factor(lp, p["ia3_l"]), {"w": w}

    def weight_map_backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dw: np.ndarray
    ) -> tuple[np.ndarray, Params]:
        l_vec = p["ia3_l"]
        return dw * self._weight_factor(lp, l_vec), {
            "ia3_l": self._factor_adjoint(lp, dw * cache["w"], l_vec)
        }

    def delta_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        """The change merging makes to the current base weight: W ⊙ l − W."""
        return base.weight * self._weight_factor(lp, p["ia3_l"]) - base.weight

    def merge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        l_vec = p["ia3_l"]
        bias = base.bias if self._bias_kept(lp, base) else base.bias * l_vec.reshape(-1)
        return base.weight * self._weight_factor(lp, l_vec), bias

    def unmerge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        l_vec = p["ia3_l"] + UNMERGE_EPS
        bias = base.bias if self._bias_kept(lp, base) else base.bias / l_vec.reshape(-1)
        return base.weight / self._weight_factor(lp, l_vec), bias

    @staticmethod
    def _weight_factor(lp: LayerPlan, l_vec: np.ndarray) -> np.ndarray:
        """l broadcast over the IR weight [out, in(/groups), *kernel]: along rows, or along input columns."""
        flat, extra = l_vec.reshape(-1), (1,) * len(lp.layer.kernel_size)
        if not lp.options["feedforward"]:
            return flat.reshape(-1, 1, *extra)
        groups = lp.layer.groups
        if groups == 1:
            return flat.reshape(1, -1, *extra)
        # grouped conv: output channel o of group k reads input channels k·(C/groups) ... (k+1)·(C/groups) − 1
        per_group = flat.reshape(groups, 1, -1, *extra)
        out = lp.layer.out_features
        return np.broadcast_to(per_group, (groups, out // groups, *per_group.shape[2:])).reshape(
            out, -1, *extra
        )

    @staticmethod
    def _factor_adjoint(lp: LayerPlan, grad: np.ndarray, l_vec: np.ndarray) -> np.ndarray:
        """Σ of ``grad`` (shaped like the weight) over the entries each element of l was broadcast to by
        :meth:`_weight_factor` (feed-forward form)."""
        groups, out = lp.layer.groups, lp.layer.out_features
        per_group = grad.reshape(groups, out // groups, grad.shape[1], -1).sum(axis=(1, 3))
        return per_group.reshape(l_vec.shape)

    @staticmethod
    def _bias_kept(lp: LayerPlan, base: BaseLayer) -> bool:
        # a feed-forward vector scales the input, so the bias is untouched
        return lp.options["feedforward"] or base.bias is None


OPS = IA3Ops()
