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

from typing import Any

import numpy as np

from peftdecl.composition import INPUT
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.boft import butterfly_perms
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.rotation import (
    cayley,
    cayley_backward,
    conv_patches,
    conv_patches_backward,
    rotate_blocks,
    rotate_blocks_backward,
)

Params = dict[str, np.ndarray]
LAYER_TYPES = ("linear", "conv2d")


def perms(lp: LayerPlan) -> tuple[np.ndarray, ...]:
    """The layer's butterfly permutations p_0..p_{N−1}."""
    o = lp.options
    return butterfly_perms(o["width"], o["block_num"], o["block_size"], o["n_butterfly_factor"])


def orthogonal_blocks(p: Params) -> tuple[np.ndarray, np.ndarray]:
    """(S, Q) of every factor's blocks, each [N, D, H, H]."""
    r = p["boft_R"]
    s = 0.5 * (r - np.swapaxes(r, -1, -2))
    return s, cayley(s)


def dropped_blocks(lp: LayerPlan, shape: tuple[int, ...], ctx: Context) -> np.ndarray | None:
    """[N, D] mask of blocks replaced by I in training: int(p·D) blocks of one randomly drawn factor."""
    rate = lp.options["dropout"]
    if not ctx.training or rate <= 0.0:
        return None
    factors, blocks = shape
    mask = np.zeros((factors, blocks), dtype=bool)
    mask[ctx.rng.integers(factors), ctx.rng.permutation(blocks)[: int(rate * blocks)]] = True
    return mask


def butterfly(
    x: np.ndarray, q: np.ndarray, order: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """x M for M = B_{N−1} ⋯ B_0, and the permuted input of every factor (for the backward pass)."""
    inputs: list[np.ndarray] = [np.empty(0)] * len(order)
    for i in reversed(range(len(order))):
        perm = order[i]
        inputs[i] = x[..., np.argsort(perm)]  # x P_i
        x = rotate_blocks(inputs[i], q[i])[..., perm]  # (…) P_iᵀ
    return x, inputs


def butterfly_backward(
    inputs: list[np.ndarray], q: np.ndarray, order: tuple[np.ndarray, ...], grad: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dx, dL/dQ) of :func:`butterfly`."""
    grad_q = np.zeros_like(q)
    for i in range(len(order)):
        perm = order[i]
        grad_in, grad_q[i] = rotate_blocks_backward(inputs[i], q[i], grad[..., np.argsort(perm)])
        grad = grad_in[..., perm]
    return grad, grad_q


def butterfly_matrix(lp: LayerPlan, p: Params) -> np.ndarray:
    """The dense M (rows of I sent through the butterfly), for merging."""
    return butterfly(np.eye(lp.options["width"]), orthogonal_blocks(p)[1], perms(lp))[0]


class BoftOps:
    kind = "boft"
    additive = False
    # HF PEFT multiplies the active adapters' butterflies as M_k ⋯ M_1: the last one transforms the input first
    input_order = "reversed"

    def forward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        s_mat, q = orthogonal_blocks(p)
        dropped = dropped_blocks(lp, q.shape[:2], ctx)
        used = q if dropped is None else np.where(dropped[..., None, None], np.eye(q.shape[-1]), q)
        scale = p["boft_s"].reshape(-1)
        info = lp.layer
        h = conv_patches(x, *_conv_args(info)) if info.is_conv else x
        rotated, inputs = butterfly(h, used, perms(lp))
        pre = rotated @ base.weight.reshape(base.weight.shape[0], -1).T  # (x M) Wᵀ, channels last
        y = pre * scale + (base.bias if base.bias is not None else 0.0)
        cache = {"x": x, "s": s_mat, "q": q, "used": used, "dropped": dropped, "inputs": inputs, "pre": pre}
        return (np.moveaxis(y, -1, 1) if info.is_conv else y), cache

    def backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray | None, Params]:
        info = lp.layer
        grad_y = np.moveaxis(dy, 1, -1) if info.is_conv else dy
        scale = p["boft_s"].reshape(-1)
        grad_s = (grad_y * cache["pre"]).reshape(-1, scale.size).sum(axis=0).reshape(p["boft_s"].shape)
        grad_rot = (grad_y * scale) @ base.weight.reshape(base.weight.shape[0], -1)
        grad_h, grad_q = butterfly_backward(cache["inputs"], cache["used"], perms(lp), grad_rot)
        dx = conv_patches_backward(grad_h, cache["x"].shape, *_conv_args(info)) if info.is_conv else grad_h
        return dx, {"boft_R": _rotation_grad(cache, grad_q), "boft_s": grad_s}

    # -- with other adapters on the layer (peftdecl_numpy.compose) -----------------------------------------
    def composition(self, lp: LayerPlan) -> str:
        """BOFT rotates the input the base reads and scales its output rows: a map of the weight."""
        return INPUT

    def weight_map(
        self, lp: LayerPlan, base: BaseLayer, p: Params, w: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """W' = diag(s) W Mᵀ (its merge): y = ((x M) Wᵀ) ⊙ s + b."""
        s_mat, q = orthogonal_blocks(p)
        dropped = dropped_blocks(lp, q.shape[:2], ctx)
        used = q if dropped is None else np.where(dropped[..., None, None], np.eye(q.shape[-1]), q)
        m, inputs = butterfly(np.eye(lp.options["width"]), used, perms(lp))
        flat = w.reshape(w.shape[0], -1)
        rotated = flat @ m.T
        cache = {"s": s_mat, "q": q, "used": used, "dropped": dropped, "inputs": inputs, "m": m}
        cache.update(w=flat, rotated=rotated)
        return (p["boft_s"].reshape(-1, 1) * rotated).reshape(w.shape), cache

    def weight_map_backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dw: np.ndarray
    ) -> tuple[np.ndarray, Params]:
        grad = dw.reshape(dw.shape[0], -1)
        grad_s = (grad * cache["rotated"]).sum(axis=1).reshape(p["boft_s"].shape)
        grad_rotated = p["boft_s"].reshape(-1, 1) * grad
        grad_m = grad_rotated.T @ cache["w"]  # d(W Mᵀ) = dW Mᵀ + W dMᵀ
        _, grad_q = butterfly_backward(cache["inputs"], cache["used"], perms(lp), grad_m)
        grads = {"boft_R": _rotation_grad(cache, grad_q), "boft_s": grad_s}
        return (grad_rotated @ cache["m"]).reshape(dw.shape), grads

    def delta_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        """W' − W (BOFT is multiplicative; provided for inspection)."""
        return self.merge(lp, base, p)[0] - base.weight

    def merge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        w = base.weight.reshape(base.weight.shape[0], -1)
        merged = p["boft_s"].reshape(-1, 1) * (w @ butterfly_matrix(lp, p).T)
        return merged.reshape(base.weight.shape), base.bias

    def unmerge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        w = base.weight.reshape(base.weight.shape[0], -1)
        restored = (w / p["boft_s"].reshape(-1, 1)) @ butterfly_matrix(lp, p)
        return restored.reshape(base.weight.shape), base.bias


def _rotation_grad(cache: dict[str, Any], grad_q: np.ndarray) -> np.ndarray:
    """dL/dR of the stored blocks from dL/dQ of the blocks applied (dropped blocks get none)."""
    if cache["dropped"] is not None:
        grad_q = np.where(cache["dropped"][..., None, None], 0.0, grad_q)
    grad_skew = cayley_backward(cache["s"], cache["q"], grad_q)
    return 0.5 * (grad_skew - np.swapaxes(grad_skew, -1, -2))


def _conv_args(info: Any) -> tuple:
    return info.kernel_size, info.stride, info.padding, info.dilation


OPS = BoftOps()
