"""BOFT (Liu et al., 2024): y = ((x M) Wᵀ) ⊙ s + b with the butterfly M = B_{N−1} ⋯ B_0,
B_i = P_i · blockdiag(Q_{i,1..D}) · P_iᵀ, Q = Cayley(S) = (I − S)(I + S)⁻¹, S = ½(R − Rᵀ).

x M is computed factor by factor (x B_i: gather by P_i, rotate blockwise by Q_i, gather by P_iᵀ), never as a
dense d × d product. Merged: W' = diag(s) W Mᵀ; unmerge uses M⁻¹ = Mᵀ (Q is exactly orthogonal). Conv2d
rotates the flattened patches the convolution reads, i.e. y = conv(x; diag(s) W Mᵀ) + b, which is what HF
PEFT's conv forward computes (it builds that weight). Training-mode ``boft_dropout`` is HF PEFT's: one factor
drawn at random has int(p·D) random blocks replaced by I. Several active adapters: y = ((x M_k ⋯ M_1) Wᵀ) ⊙
s_1 ⋯ s_k + b, HF PEFT's product (the last adapter transforms the input first), which is also their merge in turn.
Each adapter uses its own butterfly permutations; HF PEFT's layer keeps the last-added adapter's for all (they
differ only with its CUDA extension: without it every adapter has one factor and P = I).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from peftdecl.kinds import compositions
from peftdecl.plan import LayerInfo, LayerPlan
from peftdecl.plan.kinds.boft import butterfly_perms
from peftdecl_numpy.kinds.base import ComposingKind, MergeCache, Params, Tape, Weights
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.rotation import (
    cayley,
    cayley_backward,
    conv_patches,
    conv_patches_backward,
    rotate_blocks,
    rotate_blocks_backward,
)
from peftdecl_numpy.xp_ops import Array, eye_like, namespace, swap_last


def perms(lp: LayerPlan) -> tuple[np.ndarray, ...]:
    """The layer's butterfly permutations p_0..p_{N−1} (host index arrays)."""
    o = lp.options
    return butterfly_perms(o["width"], o["block_num"], o["block_size"], o["n_butterfly_factor"])


def orthogonal_blocks(p: Params) -> tuple[Array, Array]:
    """(S, Q) of every factor's blocks, each [N, D, H, H]."""
    r = p["boft_R"]
    s = 0.5 * (r - swap_last(r))
    return s, cayley(s)


def dropped_blocks(lp: LayerPlan, layer: BaseLayer, shape: tuple[int, ...]) -> Array | None:
    """[N, D] mask of blocks replaced by I in training: int(p·D) blocks of one randomly drawn factor."""
    rate = lp.options["dropout"]
    if not layer.training or rate <= 0.0:
        return None
    factors, blocks = shape
    mask = np.zeros((factors, blocks), dtype=bool)
    mask[layer.rng.integers(factors), layer.rng.permutation(blocks)[: int(rate * blocks)]] = True
    return layer.xp.asarray(mask)


def _gather(x: Array, order: np.ndarray) -> Array:
    """x[..., order] (a permutation of the last axis)."""
    xp = namespace(x)
    return xp.take(x, xp.asarray(order, dtype=xp.int64), axis=x.ndim - 1)


def butterfly(x: Array, q: Array, order: tuple[np.ndarray, ...]) -> tuple[Array, list[Array]]:
    """x M for M = B_{N−1} ⋯ B_0, and the permuted input of every factor (for the backward pass)."""
    inputs: list[Array] = [x] * len(order)
    for i in reversed(range(len(order))):
        perm = order[i]
        inputs[i] = _gather(x, np.argsort(perm))  # x P_i
        x = _gather(rotate_blocks(inputs[i], q[i, ...]), perm)  # (…) P_iᵀ
    return x, inputs


def butterfly_backward(
    inputs: list[Array], q: Array, order: tuple[np.ndarray, ...], grad: Array
) -> tuple[Array, Array]:
    """(dL/dx, dL/dQ) of :func:`butterfly`."""
    xp = namespace(q)
    grad_q = []
    for i in range(len(order)):
        perm = order[i]
        grad_in, grad_qi = rotate_blocks_backward(inputs[i], q[i, ...], _gather(grad, np.argsort(perm)))
        grad_q.append(grad_qi)
        grad = _gather(grad_in, perm)
    return grad, xp.stack(grad_q)


def butterfly_matrix(lp: LayerPlan, p: Params) -> Array:
    """The dense M (rows of I sent through the butterfly), for merging."""
    _, q = orthogonal_blocks(p)
    return butterfly(eye_like(q, lp.options["width"]), q, perms(lp))[0]


def _blocks_used(q: Array, dropped: Array | None) -> Array:
    if dropped is None:
        return q
    xp = namespace(q)
    return xp.where(xp.reshape(dropped, (*dropped.shape, 1, 1)), eye_like(q, q.shape[-1]), q)


def _rows(w: Array) -> Array:
    return namespace(w).reshape(w, (w.shape[0], -1))


class BoftOps(ComposingKind):
    kind = "boft"
    # HF PEFT multiplies the active adapters' butterflies as M_k ⋯ M_1: the last one transforms the input first
    input_order: Literal["active", "reversed"] = "reversed"

    def record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        xp = layer.xp
        s_mat, q = orthogonal_blocks(p)
        dropped = dropped_blocks(lp, layer, q.shape[:2])
        used = _blocks_used(q, dropped)
        scale = xp.reshape(p["boft_s"], (-1,))
        info = lp.layer
        h = conv_patches(x, *_conv_args(info)) if info.is_conv else x
        rotated, inputs = butterfly(h, used, perms(lp))
        pre = rotated @ _rows(layer.weight).T  # (x M) Wᵀ, channels last
        y = pre * scale if layer.bias is None else pre * scale + layer.bias
        tape = {"x": x, "s": s_mat, "q": q, "used": used, "dropped": dropped, "inputs": inputs, "pre": pre}
        return (xp.moveaxis(y, -1, 1) if info.is_conv else y), tape

    def backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array | None, Params]:
        xp = layer.xp
        info = lp.layer
        grad_y = xp.moveaxis(dy, 1, -1) if info.is_conv else dy
        scale = xp.reshape(p["boft_s"], (-1,))
        grad_s = xp.reshape(
            xp.sum(xp.reshape(grad_y * tape["pre"], (-1, scale.shape[0])), axis=0), p["boft_s"].shape
        )
        grad_rot = (grad_y * scale) @ _rows(layer.weight)
        grad_h, grad_q = butterfly_backward(tape["inputs"], tape["used"], perms(lp), grad_rot)
        dx = conv_patches_backward(grad_h, tape["x"].shape, *_conv_args(info)) if info.is_conv else grad_h
        return dx, {"boft_R": _rotation_grad(tape, grad_q), "boft_s": grad_s}

    # -- with other adapters on the layer (peftdecl_numpy.compose) -----------------------------------------
    composition = staticmethod(compositions.boft)

    def compose_weight_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, weight: Array
    ) -> tuple[Array, Tape]:
        """W' = diag(s) W Mᵀ (its merge): y = ((x M) Wᵀ) ⊙ s + b."""
        xp = layer.xp
        s_mat, q = orthogonal_blocks(p)
        dropped = dropped_blocks(lp, layer, q.shape[:2])
        used = _blocks_used(q, dropped)
        m, inputs = butterfly(eye_like(q, lp.options["width"]), used, perms(lp))
        flat = _rows(weight)
        rotated = flat @ m.T
        tape = {"s": s_mat, "q": q, "used": used, "dropped": dropped, "inputs": inputs, "m": m}
        tape.update(w=flat, rotated=rotated)
        return xp.reshape(xp.reshape(p["boft_s"], (-1, 1)) * rotated, weight.shape), tape

    def compose_weight_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_weight: Array
    ) -> tuple[Array, Params]:
        xp = layer.xp
        grad = _rows(d_weight)
        grad_s = xp.reshape(xp.sum(grad * tape["rotated"], axis=1), p["boft_s"].shape)
        grad_rotated = xp.reshape(p["boft_s"], (-1, 1)) * grad
        grad_m = grad_rotated.T @ tape["w"]  # d(W Mᵀ) = dW Mᵀ + W dMᵀ
        _, grad_q = butterfly_backward(tape["inputs"], tape["used"], perms(lp), grad_m)
        grads = {"boft_R": _rotation_grad(tape, grad_q), "boft_s": grad_s}
        return xp.reshape(grad_rotated @ tape["m"], d_weight.shape), grads

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        xp = layer.xp
        merged = xp.reshape(p["boft_s"], (-1, 1)) * (_rows(layer.weight) @ butterfly_matrix(lp, p).T)
        return xp.reshape(merged, layer.weight.shape), layer.bias

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        xp = layer.xp
        restored = (_rows(layer.weight) / xp.reshape(p["boft_s"], (-1, 1))) @ butterfly_matrix(lp, p)
        return xp.reshape(restored, layer.weight.shape), layer.bias


def _rotation_grad(tape: Tape, grad_q: Array) -> Array:
    """dL/dR of the stored blocks from dL/dQ of the blocks applied (dropped blocks get none)."""
    xp = namespace(grad_q)
    if tape["dropped"] is not None:
        dropped = tape["dropped"]
        grad_q = xp.where(xp.reshape(dropped, (*dropped.shape, 1, 1)), xp.zeros_like(grad_q), grad_q)
    grad_skew = cayley_backward(tape["s"], tape["q"], grad_q)
    return 0.5 * (grad_skew - swap_last(grad_skew))


def _conv_args(info: LayerInfo) -> tuple[tuple[int, ...], ...]:
    """(kernel size, stride, padding, dilation) of a convolution layer."""
    return info.kernel_size, info.stride, info.padding, info.dilation


OPS = BoftOps()
