"""IA3 (Liu et al., 2022): y = l ⊙ (W x + b) for attention layers, y = W (l ⊙ x) + b for feed-forward ones.

The bias is scaled too in the first form, as in HF PEFT. Merge folds l into the weight: W' = diag(l) W with
b' = l ⊙ b (rows), or W' = W diag(l) (columns; per input channel of each group for a grouped convolution).
Unmerge divides by l + 1e-8 exactly as HF PEFT does, so it is inexact (relative error ≈ 1e-8 / |l|) and loses
the weights wherever l ≈ 0. IA3 has no dropout. Several active adapters multiply their vectors, as in HF PEFT:
each scales the input (feed-forward) or the output built so far. HF PEFT's layer keeps the feed-forward flag of
its first adapter for all of them, so it never mixes the two forms on one layer; here each adapter keeps its own.
"""

from __future__ import annotations

from typing import Literal

from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import ComposingKind, MergeCache, Params, Tape, Weights
from peftdecl_numpy.layers import BaseLayer, rows
from peftdecl_numpy.xp_ops import Array, namespace

UNMERGE_EPS = 1e-8  # HF PEFT's guard against division by zero


def _on_features(lp: LayerPlan, l_vec: Array) -> Array:
    # the stored (1, C, 1, 1) already broadcasts over [N, C, H, W]; linear vectors act on the last axis
    return l_vec if lp.layer.is_conv else namespace(l_vec).reshape(l_vec, (-1,))


def _sum_to(lp: LayerPlan, t: Array, shape: tuple[int, ...]) -> Array:
    xp = namespace(t)
    if lp.layer.is_conv:
        return xp.reshape(xp.sum(t, axis=(0, *range(2, t.ndim))), shape)
    return xp.reshape(xp.sum(rows(t), axis=0), shape)


class IA3Ops(ComposingKind):
    kind = "ia3"
    # several active IA3 adapters multiply their vectors in HF PEFT; they are not summed contributions
    # diagonal scalings commute: any order gives the same product
    input_order: Literal["active", "reversed"] = "active"

    composition = staticmethod(compositions.ia3)

    def record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        if lp.options["feedforward"]:
            return layer.forward(x * _on_features(lp, p["ia3_l"])), {"x": x}
        return self.compose_output_record(lp, layer, p, x, layer.forward(x))

    def backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array | None, Params]:
        l_vec, x = p["ia3_l"], tape["x"]
        scale = _on_features(lp, l_vec)
        if lp.options["feedforward"]:
            dh = layer.input_grad(x * scale, dy)
            assert dh is not None
            return dh * scale, {"ia3_l": _sum_to(lp, dh * x, l_vec.shape)}
        dy_in, _, grads = self.compose_output_backward(lp, layer, p, tape, dy)
        return layer.input_grad(x, dy_in), grads

    def compose_output_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array, y: Array
    ) -> tuple[Array, Tape]:
        """y' = l ⊙ y: the output so far (bias included) scaled per output feature."""
        return y * _on_features(lp, p["ia3_l"]), {"x": x, "y": y}

    def compose_output_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array, Array | None, Params]:
        l_vec = p["ia3_l"]
        return dy * _on_features(lp, l_vec), None, {"ia3_l": _sum_to(lp, dy * tape["y"], l_vec.shape)}

    def compose_weight_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, weight: Array
    ) -> tuple[Array, Tape]:
        """W' = W diag(l): the input scaled per input feature (per input channel of each group)."""
        return weight * self._weight_factor(lp, p["ia3_l"]), {"w": weight}

    def compose_weight_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_weight: Array
    ) -> tuple[Array, Params]:
        l_vec = p["ia3_l"]
        return d_weight * self._weight_factor(lp, l_vec), {
            "ia3_l": self._factor_adjoint(lp, d_weight * tape["w"], l_vec)
        }

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        """The change merging makes to the current base weight: W ⊙ l − W."""
        return layer.weight * self._weight_factor(lp, p["ia3_l"]) - layer.weight

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        l_vec = p["ia3_l"]
        bias = layer.bias if self._bias_kept(lp, layer) else layer.bias * layer.xp.reshape(l_vec, (-1,))
        return layer.weight * self._weight_factor(lp, l_vec), bias

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        l_vec = p["ia3_l"] + UNMERGE_EPS
        bias = layer.bias if self._bias_kept(lp, layer) else layer.bias / layer.xp.reshape(l_vec, (-1,))
        return layer.weight / self._weight_factor(lp, l_vec), bias

    @staticmethod
    def _weight_factor(lp: LayerPlan, l_vec: Array) -> Array:
        """l broadcast over the IR weight [out, in(/groups), *kernel]: along rows, or along input columns."""
        xp = namespace(l_vec)
        flat, extra = xp.reshape(l_vec, (-1,)), (1,) * len(lp.layer.kernel_size)
        if not lp.options["feedforward"]:
            return xp.reshape(flat, (-1, 1, *extra))
        groups = lp.layer.groups
        if groups == 1:
            return xp.reshape(flat, (1, -1, *extra))
        # grouped conv: output channel o of group k reads input channels k·(C/groups) ... (k+1)·(C/groups) − 1
        per_group = xp.reshape(flat, (groups, 1, -1, *extra))
        out = lp.layer.out_features
        spread = xp.broadcast_to(per_group, (groups, out // groups, *per_group.shape[2:]))
        return xp.reshape(spread, (out, -1, *extra))

    @staticmethod
    def _factor_adjoint(lp: LayerPlan, grad: Array, l_vec: Array) -> Array:
        """Σ of ``grad`` (shaped like the weight) over the entries each element of l was broadcast to by
        :meth:`_weight_factor` (feed-forward form)."""
        xp = namespace(grad)
        groups, out = lp.layer.groups, lp.layer.out_features
        per_group = xp.sum(xp.reshape(grad, (groups, out // groups, grad.shape[1], -1)), axis=(1, 3))
        return xp.reshape(per_group, l_vec.shape)

    @staticmethod
    def _bias_kept(lp: LayerPlan, layer: BaseLayer) -> bool:
        # a feed-forward vector scales the input, so the bias is untouched
        return lp.options["feedforward"] or layer.bias is None


OPS = IA3Ops()
