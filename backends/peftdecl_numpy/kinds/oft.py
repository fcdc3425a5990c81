"""OFT (Qiu et al., 2023): y = base(x · R), R = blockdiag(R_1..R_n), R_i = Cayley(Q_i), Q_i = U_i − U_iᵀ.

Merged: W' = W Rᵀ (the weight's input axis rotated); an embedding rotates its output rows, y = E[x] R, so
E' = E R. ``use_cayley_neumann`` picks HF PEFT's Neumann series, which approximates Rᵀ of the exact transform.
Several active adapters rotate in active order, y = base(x R₁ R₂) (an embedding: E[x] R₁ R₂), but merging them in
turn gives W R₁ᵀ R₂ᵀ, the forward of the reversed order: HF PEFT does both, and so does the reference.

Choices, where HF PEFT 0.21.2 is not a well-defined reference:

- COFT: PEFT projects the parameter in place (without gradient) before every use, so that
  ‖Q_i‖_F ≤ eps/√rows. The reference does the same — the stored tensor is overwritten by its projection
  whenever a forward or a merge reads it — and its gradient is the one at that stored (projected) value.
- module_dropout: PEFT builds a block dropout (int(p·n) random blocks replaced by I in training, none with
  block_share) but its forward never applies it (tuners/oft/layer.py:414-419). The reference applies the rule.
- Conv2d: PEFT rotates k×k patches of stride 1, then *sums* overlapping patches back (F.fold), which is not a
  no-op at initialisation and differs from its merged weight for kernels > 1. The reference rotates the
  patches the convolution itself reads: y = conv(x; W Rᵀ) exactly, identical to PEFT for 1×1 kernels and to
  PEFT's merged weight for every kernel.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from peftdecl.kinds import compositions
from peftdecl.plan import LayerInfo, LayerPlan
from peftdecl_numpy.kinds.base import ComposingKind, MergeCache, Params, Tape, Weights
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.rotation import (
    cayley,
    cayley_backward,
    conv_patches,
    conv_patches_backward,
    neumann,
    neumann_backward,
    rotate_blocks,
    rotate_blocks_backward,
    skew_from_triu,
    triu_grad,
)
from peftdecl_numpy.xp_ops import Array, eye_like, namespace, swap_last


def param_name(lp: LayerPlan) -> str:
    """``oft_R.weight``, or ``oft_embedding_R.weight`` on an embedding."""
    return lp.params[0].name


def project_coft(u: Array, block: int, eps: float) -> Array:
    """Scale each row so that ‖Q_i‖_F ≤ eps/√rows (HF PEFT's ``_project_batch``); ‖Q_i‖_F = √2 ‖u_i‖."""
    xp = namespace(u)
    limit = eps / math.sqrt(u.shape[0])
    norms = xp.linalg.matrix_norm(skew_from_triu(u, block))
    ones = xp.ones_like(norms)
    factor = xp.where(norms <= limit, ones, limit / xp.where(norms > 0, norms, ones))
    return u * xp.reshape(factor, (-1, 1))


def block_rotations(lp: LayerPlan, p: Params) -> tuple[Array, Array]:
    """(Q, R) of the stored blocks (one block with block_share); COFT projects the stored tensor first."""
    opts = lp.options
    u = p[param_name(lp)]
    if opts["coft"]:
        u[...] = project_coft(u, opts["block_size"], opts["eps"])
    q = skew_from_triu(u, opts["block_size"])
    r = neumann(q, opts["num_cayley_neumann_terms"]) if opts["use_cayley_neumann"] else cayley(q)
    return q, r


def dropped_blocks(lp: LayerPlan, layer: BaseLayer, rows: int) -> Array | None:
    """Blocks replaced by I in training: int(p·rows) of them, chosen at random; none with a shared block."""
    rate = lp.options["module_dropout"]
    if not layer.training or rate <= 0.0 or rows == 1:
        return None
    mask = np.zeros(rows, dtype=bool)
    mask[layer.rng.permutation(rows)[: int(rate * rows)]] = True
    return layer.xp.asarray(mask)


def full_rotation(lp: LayerPlan, r: Array, dropped: Array | None) -> Array:
    """The n blocks the layer applies: the shared block repeated, dropped blocks set to I."""
    xp = namespace(r)
    if dropped is not None:
        r = xp.where(xp.reshape(dropped, (-1, 1, 1)), eye_like(r, r.shape[-1]), r)
    return xp.broadcast_to(r, (lp.options["n_blocks"], *r.shape[1:]))


def rotation_grads(lp: LayerPlan, tape: Tape, grad_rot: Array) -> Params:
    """dL/du of the stored parameter from dL/d(the n blocks applied), through sharing, dropout and the map."""
    xp = namespace(grad_rot)
    grad_r = xp.sum(grad_rot, axis=0, keepdims=True) if tape["r"].shape[0] == 1 else grad_rot
    if tape["dropped"] is not None:
        grad_r = xp.where(xp.reshape(tape["dropped"], (-1, 1, 1)), xp.zeros_like(grad_r), grad_r)
    q, r, opts = tape["q"], tape["r"], lp.options
    if opts["use_cayley_neumann"]:
        grad_q = neumann_backward(q, opts["num_cayley_neumann_terms"], grad_r)
    else:
        grad_q = cayley_backward(q, r, grad_r)
    return {param_name(lp): triu_grad(grad_q)}


def _flat(w: Array) -> Array:
    return namespace(w).reshape(w, (w.shape[0], -1))


def _conv_args(info: LayerInfo) -> tuple[tuple[int, ...], ...]:
    """(kernel size, stride, padding, dilation) of a convolution layer."""
    return info.kernel_size, info.stride, info.padding, info.dilation


class OftOps(ComposingKind):
    kind = "oft"
    # HF PEFT rotates the input by each active adapter in turn: x ↦ x R_1 R_2 ⋯
    input_order: Literal["active", "reversed"] = "active"

    def record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        xp = layer.xp
        tape = self._rotations(lp, layer, p)
        tape["x"] = x
        rot = tape["rot"]
        info = lp.layer
        if info.type == "embedding":
            tape["h"] = layer.forward(x)
            return rotate_blocks(tape["h"], rot), tape
        if info.type == "conv2d":
            tape["h"] = conv_patches(x, *_conv_args(info))
            y = rotate_blocks(tape["h"], rot) @ _flat(layer.weight).T
            if layer.bias is not None:
                y = y + layer.bias
            return xp.moveaxis(y, -1, 1), tape
        tape["h"] = x
        tape["xr"] = rotate_blocks(x, rot)
        return layer.forward(tape["xr"]), tape

    def backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array | None, Params]:
        info, rot = lp.layer, tape["rot"]
        if info.type == "embedding":
            grad_h = dy
        elif info.type == "conv2d":
            grad_h = layer.xp.moveaxis(dy, 1, -1) @ _flat(layer.weight)
        else:
            grad_h = layer.input_grad(tape["xr"], dy)
        grad_in, grad_rot = rotate_blocks_backward(tape["h"], rot, grad_h)
        dx = None
        if info.type == "conv2d":
            dx = conv_patches_backward(grad_in, tape["x"].shape, *_conv_args(info))
        elif info.type != "embedding":
            dx = grad_in
        return dx, rotation_grads(lp, tape, grad_rot)

    # -- with other adapters on the layer (peftdecl_numpy.compose) -----------------------------------------
    composition = staticmethod(compositions.oft)

    def compose_output_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array, y: Array
    ) -> tuple[Array, Tape]:
        """y' = y R (an embedding's output so far, rotated blockwise)."""
        tape = self._rotations(lp, layer, p)
        tape["y"] = y
        return rotate_blocks(y, tape["rot"]), tape

    def compose_output_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> tuple[Array, Array | None, Params]:
        grad_y, grad_rot = rotate_blocks_backward(tape["y"], tape["rot"], dy)
        return grad_y, None, rotation_grads(lp, tape, grad_rot)

    def compose_weight_record(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, weight: Array
    ) -> tuple[Array, Tape]:
        """W' = W Rᵀ (each row of the flattened weight rotated by the transposed blocks): y = base(x R)."""
        tape = self._rotations(lp, layer, p)
        tape["w"] = _flat(weight)
        rotated = rotate_blocks(tape["w"], swap_last(tape["rot"]))
        return layer.xp.reshape(rotated, weight.shape), tape

    def compose_weight_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_weight: Array
    ) -> tuple[Array, Params]:
        grad_w, grad_rot_t = rotate_blocks_backward(tape["w"], swap_last(tape["rot"]), _flat(d_weight))
        return layer.xp.reshape(grad_w, d_weight.shape), rotation_grads(lp, tape, swap_last(grad_rot_t))

    @staticmethod
    def _rotations(lp: LayerPlan, layer: BaseLayer, p: Params) -> Tape:
        q, r = block_rotations(lp, p)
        dropped = dropped_blocks(lp, layer, r.shape[0])
        return {"q": q, "r": r, "rot": full_rotation(lp, r, dropped), "dropped": dropped}

    def rotation(self, lp: LayerPlan, p: Params) -> Array:
        """The n rotation blocks the adapter applies (eval mode)."""
        return full_rotation(lp, block_rotations(lp, p)[1], None)

    def merge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        rot = self.rotation(lp, p)
        if lp.layer.type == "embedding":
            return rotate_blocks(layer.weight, rot), layer.bias
        # W' = W Rᵀ: each row w ↦ w Rᵀ, i.e. a blockwise rotation by the transposed blocks
        merged = rotate_blocks(_flat(layer.weight), swap_last(rot))
        return layer.xp.reshape(merged, layer.weight.shape), layer.bias

    def unmerge(self, lp: LayerPlan, layer: BaseLayer, p: Params, cache: MergeCache) -> Weights:
        # the inverse, not the transpose: a Neumann R is only approximately orthogonal
        xp = layer.xp
        inv = xp.linalg.inv(self.rotation(lp, p))
        if lp.layer.type == "embedding":
            return rotate_blocks(layer.weight, inv), layer.bias
        restored = rotate_blocks(_flat(layer.weight), swap_last(inv))
        return xp.reshape(restored, layer.weight.shape), layer.bias


OPS = OftOps()
