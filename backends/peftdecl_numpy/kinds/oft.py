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

from typing import Any

import numpy as np

from peftdecl.composition import INPUT, OUTPUT
from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds import Context
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

Params = dict[str, np.ndarray]
LAYER_TYPES = ("linear", "embedding", "conv2d")


def param_name(lp: LayerPlan) -> str:
    """``oft_R.weight``, or ``oft_embedding_R.weight`` on an embedding."""
    return lp.params[0].name


def project_coft(u: np.ndarray, block: int, eps: float) -> np.ndarray:
    """Scale each row so that ‖Q_i‖_F ≤ eps/√rows (HF PEFT's ``_project_batch``); ‖Q_i‖_F = √2 ‖u_i‖."""
    limit = eps / np.sqrt(u.shape[0])
    norms = np.linalg.norm(skew_from_triu(u, block), axis=(1, 2))
    factor = np.where(norms <= limit, 1.0, limit / np.where(norms > 0, norms, 1.0))
    return u * factor[:, None]


def block_rotations(lp: LayerPlan, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """(Q, R) of the stored blocks (one block with block_share); COFT projects the stored tensor first."""
    opts = lp.options
    u = p[param_name(lp)]
    if opts["coft"]:
        u[...] = project_coft(u, opts["block_size"], opts["eps"])
    q = skew_from_triu(u, opts["block_size"])
    r = neumann(q, opts["num_cayley_neumann_terms"]) if opts["use_cayley_neumann"] else cayley(q)
    return q, r


def dropped_blocks(lp: LayerPlan, rows: int, ctx: Context) -> np.ndarray | None:
    """Blocks replaced by I in training: int(p·rows) of them, chosen at random; none with a shared block."""
    rate = lp.options["module_dropout"]
    if not ctx.training or rate <= 0.0 or rows == 1:
        return None
    mask = np.zeros(rows, dtype=bool)
    mask[ctx.rng.permutation(rows)[: int(rate * rows)]] = True
    return mask


def full_rotation(lp: LayerPlan, r: np.ndarray, dropped: np.ndarray | None) -> np.ndarray:
    """The n blocks the layer applies: the shared block repeated, dropped blocks set to I."""
    if dropped is not None:
        r = np.where(dropped[:, None, None], np.eye(r.shape[-1]), r)
    return np.broadcast_to(r, (lp.options["n_blocks"], *r.shape[1:]))


def rotation_grads(lp: LayerPlan, cache: dict[str, Any], grad_rot: np.ndarray) -> Params:
    """dL/du of the stored parameter from dL/d(the n blocks applied), through sharing, dropout and the map."""
    grad_r = grad_rot.sum(axis=0, keepdims=True) if cache["r"].shape[0] == 1 else grad_rot
    if cache["dropped"] is not None:
        grad_r = np.where(cache["dropped"][:, None, None], 0.0, grad_r)
    q, r, opts = cache["q"], cache["r"], lp.options
    if opts["use_cayley_neumann"]:
        grad_q = neumann_backward(q, opts["num_cayley_neumann_terms"], grad_r)
    else:
        grad_q = cayley_backward(q, r, grad_r)
    return {param_name(lp): triu_grad(grad_q)}


def _flat(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1)


def _conv_args(info: Any) -> tuple:
    return info.kernel_size, info.stride, info.padding, info.dilation


class OftOps:
    kind = "oft"
    additive = False
    input_order = "active"  # HF PEFT rotates the input by each active adapter in turn: x ↦ x R_1 R_2 ⋯

    def forward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        cache = self._rotations(lp, p, ctx)
        cache["x"] = x
        rot = cache["rot"]
        info = lp.layer
        if info.type == "embedding":
            cache["h"] = base.forward(x)
            return rotate_blocks(cache["h"], rot), cache
        if info.type == "conv2d":
            cache["h"] = conv_patches(x, *_conv_args(info))
            y = rotate_blocks(cache["h"], rot) @ _flat(base.weight).T
            if base.bias is not None:
                y = y + base.bias
            return np.moveaxis(y, -1, 1), cache
        cache["h"] = x
        cache["xr"] = rotate_blocks(x, rot)
        return base.forward(cache["xr"]), cache

    def backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray | None, Params]:
        info, rot = lp.layer, cache["rot"]
        if info.type == "embedding":
            grad_h = dy
        elif info.type == "conv2d":
            grad_h = np.moveaxis(dy, 1, -1) @ _flat(base.weight)
        else:
            grad_h = base.input_grad(cache["xr"], dy)
        grad_in, grad_rot = rotate_blocks_backward(cache["h"], rot, grad_h)
        dx = None
        if info.type == "conv2d":
            dx = conv_patches_backward(grad_in, cache["x"].shape, *_conv_args(info))
        elif info.type != "embedding":
            dx = grad_in
        return dx, rotation_grads(lp, cache, grad_rot)

    # -- with other adapters on the layer (peftdecl_numpy.compose) -----------------------------------------
    def composition(self, lp: LayerPlan) -> str:
        """An embedding's rotation acts on the output built so far; any other layer's on its input."""
        return OUTPUT if lp.layer.type == "embedding" else INPUT

    def output_map(
        self, lp: LayerPlan, base: BaseLayer, p: Params, x: np.ndarray, y: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """y' = y R (an embedding's output so far, rotated blockwise)."""
        cache = self._rotations(lp, p, ctx)
        cache["y"] = y
        return rotate_blocks(y, cache["rot"]), cache

    def output_map_backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dy: np.ndarray
    ) -> tuple[np.ndarray, None, Params]:
        grad_y, grad_rot = rotate_blocks_backward(cache["y"], cache["rot"], dy)
        return grad_y, None, rotation_grads(lp, cache, grad_rot)

    def weight_map(
        self, lp: LayerPlan, base: BaseLayer, p: Params, w: np.ndarray, ctx: Context
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """W' = W Rᵀ (each row of the flattened weight rotated by the transposed blocks): y = base(x R)."""
        cache = self._rotations(lp, p, ctx)
        cache["w"] = _flat(w)
        return rotate_blocks(cache["w"], cache["rot"].transpose(0, 2, 1)).reshape(w.shape), cache

    def weight_map_backward(
        self, lp: LayerPlan, base: BaseLayer, p: Params, cache: dict[str, Any], dw: np.ndarray
    ) -> tuple[np.ndarray, Params]:
        rot_t = cache["rot"].transpose(0, 2, 1)
        grad_w, grad_rot_t = rotate_blocks_backward(cache["w"], rot_t, _flat(dw))
        return grad_w.reshape(dw.shape), rotation_grads(lp, cache, grad_rot_t.transpose(0, 2, 1))

    @staticmethod
    def _rotations(lp: LayerPlan, p: Params, ctx: Context) -> dict[str, Any]:
        q, r = block_rotations(lp, p)
        dropped = dropped_blocks(lp, r.shape[0], ctx)
        return {"q": q, "r": r, "rot": full_rotation(lp, r, dropped), "dropped": dropped}

    def rotation(self, lp: LayerPlan, p: Params) -> np.ndarray:
        """The n rotation blocks the adapter applies (eval mode)."""
        return full_rotation(lp, block_rotations(lp, p)[1], None)

    def delta_weight(self, lp: LayerPlan, base: BaseLayer, p: Params) -> np.ndarray:
        """W' − W (OFT is multiplicative; provided for inspection)."""
        return self.merge(lp, base, p)[0] - base.weight

    def merge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        rot = self.rotation(lp, p)
        if lp.layer.type == "embedding":
            return rotate_blocks(base.weight, rot), base.bias
        # W' = W Rᵀ: each row w ↦ w Rᵀ, i.e. a blockwise rotation by the transposed blocks
        merged = rotate_blocks(_flat(base.weight), rot.transpose(0, 2, 1))
        return merged.reshape(base.weight.shape), base.bias

    def unmerge(self, lp: LayerPlan, base: BaseLayer, p: Params) -> tuple[np.ndarray, np.ndarray | None]:
        # the inverse, not the transpose: a Neumann R is only approximately orthogonal
        inv = np.linalg.inv(self.rotation(lp, p))
        if lp.layer.type == "embedding":
            return rotate_blocks(base.weight, inv), base.bias
        restored = rotate_blocks(_flat(base.weight), inv.transpose(0, 2, 1))
        return restored.reshape(base.weight.shape), base.bias


OPS = OftOps()
