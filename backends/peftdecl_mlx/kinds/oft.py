"""OFT (Qiu et al., 2023) on MLX: y = base(x · R), R = blockdiag(R_1..R_n), R_i = Cayley(Q_i), Q_i = U_i − U_iᵀ.

An embedding rotates its output rows, y = E[x] R. Merged: W' = W Rᵀ (E' = E R); unmerge uses R⁻¹, since HF PEFT's
Neumann series (``use_cayley_neumann``, which approximates Rᵀ of the exact transform) is not exactly orthogonal.
COFT projects the stored tensor before every use so that ‖Q_i‖_F ≤ eps/√rows, with no gradient through the
projection (HF PEFT's in-place ``_project_batch``); training-mode module_dropout sets int(p·n) random blocks to I.
Several active adapters rotate in active order, y = base(x R₁ R₂) (merged in turn: W R₁ᵀ R₂ᵀ, the forward of the
reversed order, as in HF PEFT).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import mlx.core as mx
import numpy as np

from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._protocols import MergeCache, Params
from peftdecl_mlx.rotation import cayley, neumann, rotate_blocks, skew_from_triu

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer


def project_coft(u: mx.array, eps: float) -> mx.array:
    """Scale each row so that ‖Q_i‖_F = √2 ‖u_i‖ ≤ eps/√rows."""
    limit = eps / math.sqrt(u.shape[0])
    norms = math.sqrt(2.0) * mx.linalg.norm(u, axis=1)
    factor = mx.where(norms <= limit, 1.0, limit / mx.where(norms > 0, norms, 1.0))
    return u * factor[:, None]


def block_rotations(lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
    """The stored blocks' rotations [rows, b, b] (one row with block_share)."""
    opts, name = lp.options, lp.params[0].name
    u = p[name]
    if opts["coft"]:
        projected = mx.stop_gradient(project_coft(u, opts["eps"]))
        layer.overwrite(lp, name, projected)
        u = u + mx.stop_gradient(projected - u)  # the projected value, with the gradient taken there
    q = skew_from_triu(u, opts["block_size"])
    return neumann(q, opts["num_cayley_neumann_terms"]) if opts["use_cayley_neumann"] else cayley(q)


def full_rotation(lp: LayerPlan, layer: AdaptedLayer, r: mx.array, training: bool) -> mx.array:
    """The n blocks the layer applies: dropped blocks set to I (training), a shared block repeated."""
    rows, rate = r.shape[0], lp.options["module_dropout"]
    if training and rate > 0.0 and rows > 1:
        dropped = np.zeros(rows, dtype=bool)
        dropped[layer.permutation(rows)[: int(rate * rows)]] = True
        r = mx.where(mx.array(dropped)[:, None, None], mx.eye(r.shape[-1], dtype=r.dtype), r)
    return mx.broadcast_to(r, (lp.options["n_blocks"], *r.shape[1:]))


class OftOps:
    kind = "oft"
    additive = False
    # HF PEFT rotates the input by each active adapter in turn: x ↦ x R₁ R₂ ⋯
    input_order: Literal["active", "reversed"] = "active"

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """y = base(x R) (an embedding's: E[x] R)."""
        rot = full_rotation(lp, layer, block_rotations(lp, layer, p), layer.training)
        if lp.layer.type == "embedding":
            return rotate_blocks(layer.base_forward(x), rot)
        return layer.base_forward(rotate_blocks(x, rot))

    composition = staticmethod(compositions.oft)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array, y: mx.array
    ) -> mx.array:
        """y R: an embedding's output so far, rotated blockwise."""
        return rotate_blocks(y, full_rotation(lp, layer, block_rotations(lp, layer, p), layer.training))

    def compose_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: mx.array) -> mx.array:
        """W Rᵀ (each row rotated by the transposed blocks): y = base(x R)."""
        rot = full_rotation(lp, layer, block_rotations(lp, layer, p), layer.training)
        return rotate_blocks(weight, rot.swapaxes(-1, -2))

    def rotation(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """The n rotation blocks the adapter applies (eval mode)."""
        return full_rotation(lp, layer, block_rotations(lp, layer, p), False)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> mx.array:
        """W Rᵀ − W (an embedding's: E R − E): the merged weight less the current one."""
        return self.merge(lp, layer, p, {})[0] - layer.weight

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(W Rᵀ, b); an embedding's (E R, None)."""
        rot = self.rotation(lp, layer, p)
        if lp.layer.type == "embedding":
            return rotate_blocks(layer.weight, rot), layer.bias
        # W' = W Rᵀ: each row w ↦ w Rᵀ, a blockwise rotation by the transposed blocks
        return rotate_blocks(layer.weight, rot.swapaxes(-1, -2)), layer.bias

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        """(W R⁻ᵀ, b): R⁻¹ rather than Rᵀ, since the Neumann series is not exactly orthogonal."""
        inverse = mx.linalg.inv(self.rotation(lp, layer, p), stream=mx.cpu)
        if lp.layer.type == "embedding":
            return rotate_blocks(layer.weight, inverse), layer.bias
        return rotate_blocks(layer.weight, inverse.swapaxes(-1, -2)), layer.bias


OPS = OftOps()
