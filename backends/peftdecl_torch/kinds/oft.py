"""OFT (Qiu et al., 2023) on torch: y = base(x · R), R = blockdiag(R_1..R_n), R_i = Cayley(Q_i), Q_i = U_i − U_iᵀ.

An embedding rotates its output, y = E[x] R; a convolution runs with the rotated kernel W Rᵀ (the patches it
reads, rotated), as the NumPy reference defines it. ``use_cayley_neumann`` picks HF PEFT's Neumann series (≈ Rᵀ of
the exact transform). COFT projects the stored tensor in place before each use; training-mode module dropout
replaces int(p·n) random blocks by I. Several active adapters rotate in active order, y = base(x R₁ R₂) (merged in
turn: W R₁ᵀ R₂ᵀ, the forward of the reversed order, as in HF PEFT).

A linear layer (T tokens, W d_out × d_in, blocks of b) rotates whichever is smaller (:mod:`._fused`): the input,
x ↦ x R blockwise (T·d_in·b work, composed torch ops), or, from T ≥ d_out tokens, the weight:
:class:`OftLinearFunction` runs y = x (W Rᵀ)ᵀ + b as one matmul after a blockwise W Rᵀ (d_out·d_in·b work, never
a d × d rotation). Its backward pass has two forms, both exact (g = dy W is the gradient at the rotated input):

- by inversion (CPU, R close to orthogonal): dx = dy (W Rᵀ), one matmul with the rebuilt rotated weight, and
  dL/dR_i = Σ_t x_iᵀ g_i = (Σ_t x_iᵀ dx_i) R_i⁻ᵀ, a b × b solve per block, since dx_i = g_i R_iᵀ;
- directly: g = dy W, dx_i = g_i R_iᵀ blockwise, dL/dR_i = Σ_t x_iᵀ g_i.

The first replaces the T·d_in·b rotation of g by the d_out·d_in·b rotation of W (docs/performance.md). It needs
R_i well conditioned: it is used while max_i ‖R_i R_iᵀ − I‖_F ≤ MAX_DEFECT (then cond(R_i) ≤ √3), which the
exact Cayley transform always meets and the Neumann series meets for the small Q_i that training from R = I
produces (not for large random Q_i, e.g. init_weights=False). Off the CPU the check would stall the device, so the
direct form runs there. Both forms return a row-major dx and allocate no T × d temporary beyond g.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds import _fused as fused
from peftdecl_torch.kinds._rotation import cayley, neumann, rotate_blocks, skew_from_triu

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


Params = dict[str, torch.Tensor]


def project_coft(u: torch.Tensor, block: int, eps: float) -> None:
    """Scale each row in place so that ‖Q_i‖_F ≤ eps/√rows (HF PEFT's ``_project_batch``)."""
    with torch.no_grad():
        limit = eps / u.shape[0] ** 0.5
        norms = torch.linalg.matrix_norm(skew_from_triu(u, block))
        factor = torch.where(
            norms <= limit, torch.ones_like(norms), limit / torch.where(norms > 0, norms, 1.0)
        )
        u.mul_(factor[:, None])


def block_rotations(lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
    """R of the stored blocks (one block with block_share)."""
    opts = lp.options
    u = p[lp.params[0].name]
    if opts["coft"]:
        project_coft(u, opts["block_size"], opts["eps"])
    q = skew_from_triu(u, opts["block_size"])
    return neumann(q, opts["num_cayley_neumann_terms"]) if opts["use_cayley_neumann"] else cayley(q)


def full_rotation(lp: LayerPlan, layer: AdaptedLayer, r: torch.Tensor, training: bool) -> torch.Tensor:
    """The n blocks the layer applies: a shared block repeated; in training int(p·n) random blocks set to I (drawn
    from the engine's generator)."""
    rate, rows = lp.options["module_dropout"], r.shape[0]
    if training and rate > 0.0 and rows > 1:
        dropped = torch.zeros(rows, dtype=torch.bool, device=r.device)
        dropped[layer.permutation(rows, r.device)[: int(rate * rows)]] = True
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        r = torch.where(dropped[:, None, None], eye, r)
    return r.expand(lp.options["n_blocks"], *r.shape[1:])


def _rotated_kernel(
    layer: AdaptedLayer, rot: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """W Rᵀ, row by row, for the layer's weight or ``weight`` (IR layout)."""
    weight = layer.weight_ir() if weight is None else weight
    flat = weight.reshape(weight.shape[0], -1).to(rot.dtype)
    return rotate_blocks(flat, rot.transpose(1, 2)).reshape(weight.shape)


MAX_DEFECT = 0.5
"""Largest ‖R_i R_iᵀ − I‖_F for which the backward pass solves with R_i (see the module docstring)."""


class OftLinearFunction(torch.autograd.Function):
    """y = (x R) Wᵀ + b for a frozen W, run as one matmul with the rotated weight W Rᵀ; the backward pass of the
    module docstring. ``rot`` is an autograd input, so the gradient reaches the stored parameters through the
    Cayley/Neumann map."""

    @staticmethod
    def forward(
        ctx: fused.WeightContext,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rot: torch.Tensor,
        stored_in_out: bool,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        rotated_t = _rotate_rows_of_transpose(rot, fused.weight_ir(weight, stored_in_out))  # R Wᵀ, [in, out]
        y = fused.linear(x2, rotated_t.t(), bias)
        ctx.stored_in_out = stored_in_out
        ctx.save_for_backward(x, weight, rot)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: fused.WeightContext, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, rot = ctx.saved_tensors
        n, b, _ = rot.shape
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        w = fused.weight_ir(weight, ctx.stored_in_out)
        need_x, need_rot = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        drot = None
        if need_x and (not need_rot or _invertible(rot)):
            dx2 = torch.mm(dy2, _rotate_rows_of_transpose(rot, w).t())  # dy (W Rᵀ)
            if need_rot:  # Σ_t x_iᵀ dx_i = (Σ_t x_iᵀ g_i) R_iᵀ
                drot = torch.linalg.solve(rot.transpose(1, 2), _blockwise_tn(x2, dx2, n, b), left=False)
            return dx2.view(x.shape), None, None, drot, None
        grad_rotated = torch.mm(dy2, w)  # g = dy W, [T, in]
        if need_rot:
            drot = _blockwise_tn(x2, grad_rotated, n, b)
        dx = _rotate_rows_in_place(grad_rotated, rot.transpose(1, 2)).view(x.shape) if need_x else None
        return dx, None, None, drot, None


def _invertible(rot: torch.Tensor) -> bool:
    """Whether every block is within MAX_DEFECT of orthogonal (checked on the CPU only, see the module docstring)."""
    if rot.device.type != "cpu" or rot.dtype in fused.HALF:  # no half-precision solve on the CPU
        return False
    eye = torch.eye(rot.shape[-1], dtype=rot.dtype, device=rot.device)
    defect = torch.linalg.matrix_norm(torch.bmm(rot, rot.transpose(1, 2)) - eye)
    return bool(defect.max() <= MAX_DEFECT)


def _blockwise_tn(x2: torch.Tensor, g2: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """Σ_t x_iᵀ g_i per block i, [n, b, b], read in place through strided views; on the CPU accumulated over
    row slices that stay in cache."""
    rows = x2.shape[0]
    k = fused.SPLIT_K
    if x2.device.type != "cpu" or rows % k or rows < 128 * k:
        k = 1
    xs, gs = x2.reshape(k, rows // k, n, b), g2.reshape(k, rows // k, n, b)
    out = torch.bmm(xs[0].permute(1, 2, 0), gs[0].transpose(0, 1))
    for j in range(1, k):
        out.baddbmm_(xs[j].permute(1, 2, 0), gs[j].transpose(0, 1))
    return out


def _rotate_rows_in_place(m: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """m ← m · blockdiag(rot) for a contiguous m [rows, n·b], one row slice at a time: the temporary stays small
    (a fresh T × d temporary costs page faults that can exceed the arithmetic on a CPU)."""
    n, b, _ = rot.shape
    rows = m.shape[0]
    step = max(1, min(rows, -(-rows // fused.SPLIT_K)))
    view = m.view(rows, n, b)
    for start in range(0, rows, step):
        part = view[start : start + step]
        part.copy_(torch.bmm(part.transpose(0, 1), rot).transpose(0, 1))
    return m


def _rotate_rows_of_transpose(rot: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """R_bd mᵀ for m [rows, n·b]: one batched matmul on the strided view of mᵀ (no copies), contiguous result."""
    n, b, _ = rot.shape
    return torch.bmm(rot, m.t().view(n, b, -1)).view(n * b, -1)


class OftOps:
    """OFT's :class:`peftdecl.backend.ComposingOps`: INPUT (x ↦ x R) except on an embedding (OUTPUT, y ↦ y R)."""

    kind = "oft"
    additive = False
    input_order = "active"  # HF PEFT rotates the input by each active adapter in turn: x ↦ x R₁ R₂ ⋯

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        rot = self._rotation(lp, layer, p, layer.training)
        if lp.layer.type == "embedding":
            y = layer.base_forward(x)
            return rotate_blocks(y.to(rot.dtype), rot).to(y.dtype)
        if lp.layer.type == "conv2d":
            weight = _rotated_kernel(layer, rot)
            bias = None if layer.bias is None else layer.bias.to(rot.dtype)
            return layer.functional(x.to(rot.dtype), weight, bias).to(x.dtype)
        if fused.fusable(lp, layer, x, rot.dtype, half_compute=True) and fused.rotate_weight_pays(
            lp, layer, x
        ):
            (rot,) = fused.compute_dtype(x, rot)  # a half base rotates its weight in its own dtype (_fused)
            out: torch.Tensor = OftLinearFunction.apply(x, layer.base_weight, layer.bias, rot, False)
            return out
        return layer.base_forward(rotate_blocks(x.to(rot.dtype), rot).to(x.dtype))

    composition = staticmethod(compositions.oft)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """y R: an embedding's output so far, rotated blockwise."""
        return rotate_blocks(y, self._rotation(lp, layer, p, layer.training))

    def compose_weight(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: torch.Tensor
    ) -> torch.Tensor:
        """W Rᵀ: the input rotated (y = base(x R))."""
        return _rotated_kernel(layer, self._rotation(lp, layer, p, layer.training), weight)

    def rotation(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        """The n rotation blocks the adapter applies (eval mode)."""
        return self._rotation(lp, layer, p, False)

    @staticmethod
    def _rotation(lp: LayerPlan, layer: AdaptedLayer, p: Params, training: bool) -> torch.Tensor:
        return full_rotation(lp, layer, block_rotations(lp, layer, p), training)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        """W' − W (OFT is multiplicative; provided for inspection)."""
        return self.merge(lp, layer, p, {})[0] - layer.weight_ir()

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._apply(lp, layer, self.rotation(lp, layer, p)), None

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # the inverse, not the transpose: a Neumann R is only approximately orthogonal
        return self._apply(lp, layer, torch.linalg.inv(self.rotation(lp, layer, p))), None

    @staticmethod
    def _apply(lp: LayerPlan, layer: AdaptedLayer, rot: torch.Tensor) -> torch.Tensor:
        weight = layer.weight_ir()
        if lp.layer.type == "embedding":
            return rotate_blocks(weight.to(rot.dtype), rot).to(weight.dtype)  # E' = E R
        return _rotated_kernel(layer, rot).to(weight.dtype)  # W' = W Rᵀ


OPS = OftOps()
