"""The kernel table: which reference methods the CuPy backend overrides, and when each override applies.

Overrides (``fn(ops, lp, layer, p, ...)``, see :mod:`peftdecl_cupy.dispatch`) take their kernels from three
small kernel sets, so the same table runs on CuPy with the real kernels or on NumPy with fakes (the dispatch
tests). Each override checks its case first and returns ``NotImplemented`` before any random draw or write,
so the reference then runs exactly as it would have:
- lora: ``record``, ``delta_record`` (shrink, then expand into the base output in one pass) and
  ``delta_backward`` (dB and dA by the split token sum, du by a shrink with Bᵀ, dx by an expand with Aᵀ), on
  dense layers (linear, GPT-2 Conv1D) without ``lora_bias``;
- adalora: ``delta_record`` (the shrink scales rank i by Λᵢ·maskᵢ); its backward is the reference's;
- dora: ``weight_norm`` (‖W‖² rows, W Aᵀ and A Aᵀ, never B A) and ``compose_output_record`` (the output pass
  with g = m / n fused) in evaluation or without dropout; its backward is the reference's;
- mixed batches (``MIXED``): every adapter in the batch a dense-layer LoRA, in evaluation.
"""

from __future__ import annotations

from typing import Any, Protocol

from peftdecl.backend import BASE_ROW, check_adapter_names
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.dora import MAGNITUDE
from peftdecl_cupy import planning
from peftdecl_cupy.dispatch import KernelOps, KernelTable, Override
from peftdecl_numpy.kinds.adalora import rank_mask, singular_values
from peftdecl_numpy.kinds.base import Params, Tape
from peftdecl_numpy.kinds.dora import magnitude_scale
from peftdecl_numpy.layers import BaseLayer, dropout_mask

Array = Any
DENSE = ("linear", "gpt2_conv1d")
MIXED = "__mixed_batch__"
"""The table's entry for mixed batches: ``{"forward": fn(engine, module, layer, x, names)}``."""


class LowRankKernels(Protocol):
    """U = α (X Aᵀ) ⊙ e; Y ← [Y +] α U Bᵀ in place; G ← [G +] α Uᵀ X into ``out`` (:mod:`peftdecl_cupy.lowrank`)."""

    def accepts(self, *arrays: Array) -> bool: ...
    def shrink(self, x: Array, a: Array, alpha: float = 1.0, rank_scale: Array | None = None) -> Array: ...
    def expand(self, u: Array, b: Array, y: Array, alpha: float = 1.0, accumulate: bool = True) -> Array: ...
    def outer(
        self, u: Array, x: Array, out: Array, alpha: float = 1.0, accumulate: bool = False
    ) -> Array: ...


class MixedKernels(Protocol):
    """Y[t] += s_i · (X[t] A_iᵀ) B_iᵀ for the adapter i = index[t] of every token (-1: none), in place."""

    def accepts(self, *arrays: Array) -> bool: ...
    def run(self, x: Array, y: Array, adapters: list[tuple[Array, Array, float]], index: Any) -> Array: ...


class DoraKernels(Protocol):
    """n = ‖W + s B A‖ per row; (Y', D) with D = Y − b + s U Bᵀ and Y' = b + (m / n) ⊙ D."""

    def accepts(self, *arrays: Array) -> bool: ...
    def norm(self, weight: Array, a: Array, b: Array, s: float) -> Array: ...
    def output(
        self, u: Array, b: Array, y: Array, bias: Array | None, m: Array, n: Array, s: float
    ) -> tuple[Array, Array]: ...


def _dense_lora(lp: LayerPlan, p: Params) -> bool:
    return lp.layer.type in DENSE and "lora_B.bias" not in p


def _rows(t: Array) -> Array:
    return t.reshape(-1, t.shape[-1])


def _lora_delta(
    low: LowRankKernels, ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array
) -> Any:
    """(u [tokens, r], h, mask) or NotImplemented; u = h Aᵀ with h the (dropped-out) input."""
    if not (_dense_lora(lp, p) and low.accepts(x, p["lora_A.weight"], p["lora_B.weight"])):
        return NotImplemented
    a = p["lora_A.weight"]
    mask = dropout_mask(layer, x.shape, lp.options["dropout"])
    h = x if mask is None else x * mask
    return low.shrink(_rows(h), a), h, mask


def _low_rank_grads(
    low: LowRankKernels,
    xp: Any,
    d: Array,
    tape: Tape,
    a: Array,
    b: Array,
    s: float,
    into: Array | None = None,
) -> tuple[Array, Array, Array]:
    """(dL/dh, dL/dA, dL/dB) of s·(h Aᵀ) Bᵀ from its gradient ``d`` [tokens, n] and the tape's h and u = h Aᵀ:
    dB = s·dᵀ u, du = s·d B, dA = duᵀ h, dh = du A (four launches, no [tokens, n] temporary). With ``into``
    (the base's dL/dx, C-contiguous) dh is added into it in place and it is returned as dL/dh."""
    h, u = _rows(tape["h"]), _rows(tape["u"])
    grad_b, grad_a = xp.empty_like(b), xp.empty_like(a)
    low.outer(u, d, grad_b.T, s)  # written through its transpose
    du = low.shrink(d, b.T, s)
    low.outer(du, h, grad_a)
    dh = xp.empty(h.shape, dtype=h.dtype) if into is None else _rows(into)
    low.expand(du, a.T, dh, accumulate=into is not None)
    return dh.reshape(tape["h"].shape), grad_a, grad_b


def lora_overrides(low: LowRankKernels) -> dict[str, Override]:
    """LoRA's overrides on ``low``."""

    def record(ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> Any:
        found = _lora_delta(low, ops, lp, layer, p, x)
        if found is NotImplemented:
            return found
        u, h, mask = found
        y = layer.forward(x)  # the base GEMM; s·B u is then added into it in one pass
        low.expand(u, p["lora_B.weight"], _rows(y), lp.scaling, accumulate=True)
        tape = {"x": x, "h": h, "u": u.reshape(*x.shape[:-1], -1), "mask": mask}
        return y, {"x": x, "delta": tape}

    def delta_record(ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> Any:
        found = _lora_delta(low, ops, lp, layer, p, x)
        if found is NotImplemented:
            return found
        u, h, mask = found
        b = p["lora_B.weight"]
        delta = layer.xp.empty((*x.shape[:-1], b.shape[0]), dtype=x.dtype)
        low.expand(u, b, _rows(delta), lp.scaling, accumulate=False)
        return delta, {"x": x, "h": h, "u": u.reshape(*x.shape[:-1], -1), "mask": mask}

    def delta_backward(
        ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d: Array
    ) -> Any:
        if not (_dense_lora(lp, p) and "h" in tape):
            return NotImplemented
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if not low.accepts(d, a, b, tape["h"]):
            return NotImplemented
        dh, grad_a, grad_b = _low_rank_grads(low, layer.xp, _rows(d), tape, a, b, lp.scaling)
        mask = tape["mask"]
        return (dh if mask is None else dh * mask), {"lora_A.weight": grad_a, "lora_B.weight": grad_b}

    def backward(ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array) -> Any:
        # without dropout dh joins the base's dL/dx = dy W in place: one output pass less than dx + dh
        delta = tape.get("delta", {})
        if not (_dense_lora(lp, p) and "h" in delta and delta.get("mask", 0) is None):
            return NotImplemented
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if not low.accepts(dy, a, b, delta["h"]):
            return NotImplemented
        dx = layer.input_grad(tape["x"], dy)
        dx, grad_a, grad_b = _low_rank_grads(low, layer.xp, _rows(dy), delta, a, b, lp.scaling, into=dx)
        return dx, {"lora_A.weight": grad_a, "lora_B.weight": grad_b}

    return {
        "record": record,
        "delta_record": delta_record,
        "delta_backward": delta_backward,
        "backward": backward,
    }


def adalora_overrides(low: LowRankKernels) -> dict[str, Override]:
    """AdaLoRA on ``low``: Λ (with the rank mask) scales the shrink's ranks; the backward runs the low-rank
    gradients on Q Λ and takes dΛ = Σ_i dQΛ ⊙ Q, dQ = dQΛ ⊙ Λ on the small [r, in] matrices."""

    def delta_record(ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> Any:
        if lp.layer.type not in DENSE or not low.accepts(x, p["lora_A"], p["lora_B"]):
            return NotImplemented
        a, b = p["lora_A"], p["lora_B"]
        mask = dropout_mask(layer, x.shape, lp.options["dropout"])
        h = x if mask is None else x * mask
        u = low.shrink(_rows(h), a, rank_scale=singular_values(lp, p))
        delta = layer.xp.empty((*x.shape[:-1], b.shape[0]), dtype=x.dtype)
        low.expand(u, b, _rows(delta), lp.scaling, accumulate=False)
        return delta, {"h": h, "u": u.reshape(*x.shape[:-1], -1), "mask": mask}

    def delta_backward(
        ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d: Array
    ) -> Any:
        if lp.layer.type not in DENSE or "u" not in tape or not low.accepts(d, p["lora_A"], p["lora_B"]):
            return NotImplemented
        xp, a, e = layer.xp, p["lora_A"], singular_values(lp, p)
        dh, grad_qe, grad_b = _low_rank_grads(low, xp, _rows(d), tape, a * e, p["lora_B"], lp.scaling)
        grad_e = xp.sum(grad_qe * a, axis=1, keepdims=True)
        keep = rank_mask(lp, e)
        grads = {"lora_A": grad_qe * e, "lora_E": grad_e if keep is None else grad_e * keep, "lora_B": grad_b}
        mask = tape["mask"]
        return (dh if mask is None else dh * mask), grads

    return {"delta_record": delta_record, "delta_backward": delta_backward}


def dora_overrides(low: LowRankKernels, dora: DoraKernels) -> dict[str, Override]:
    """DoRA's norm and output pass on ``dora`` (U = h Aᵀ on ``low``)."""

    def weight_norm(ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params) -> Any:
        if lp.layer.type not in DENSE or not dora.accepts(
            layer.weight, p["lora_A.weight"], p["lora_B.weight"]
        ):
            return NotImplemented
        return dora.norm(layer.weight, p["lora_A.weight"], p["lora_B.weight"], lp.scaling)

    def compose_output_record(
        ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array, y: Array
    ) -> Any:
        no_dropout = not layer.training or lp.options["dropout"] <= 0.0
        if not (_dense_lora(lp, p) and no_dropout):
            return NotImplemented
        a, b, m = p["lora_A.weight"], p["lora_B.weight"], p[MAGNITUDE]
        if not (low.accepts(x, a, b, y) and dora.accepts(x, m)):
            return NotImplemented
        n = ops.weight_norm(lp, layer, p)
        u = low.shrink(_rows(x), a)
        out, direction = dora.output(u, b, _rows(y), layer.bias, m, n, lp.scaling)
        shape = y.shape
        tape = {"x": x, "n": n, "g": magnitude_scale(m, n), "h": x, "u": u.reshape(*x.shape[:-1], -1)}
        tape.update(mask=None, direction=direction.reshape(shape))
        return out.reshape(shape), tape

    def compose_output_backward(
        ops: KernelOps, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, dy: Array
    ) -> Any:
        # the kernels' own tape (dense layer, no dropout): dL/dm = Σ_t dy ⊙ D / n, then LoRA's gradients of g ⊙ dy
        if not (_dense_lora(lp, p) and tape.get("mask", 0) is None and "u" in tape):
            return NotImplemented
        a, b, m = p["lora_A.weight"], p["lora_B.weight"], p[MAGNITUDE]
        if not low.accepts(dy, a, b):
            return NotImplemented
        xp, n, g = layer.xp, tape["n"], tape["g"]
        dg = xp.sum(_rows(dy * tape["direction"]), axis=0)
        positive = n > 0
        grad_m = xp.where(positive, dg / xp.where(positive, n, xp.ones_like(n)), xp.zeros_like(dg))
        scaled = g * dy
        dh, grad_a, grad_b = _low_rank_grads(low, xp, _rows(scaled), tape, a, b, lp.scaling)
        grads = {"lora_A.weight": grad_a, "lora_B.weight": grad_b, MAGNITUDE: xp.reshape(grad_m, m.shape)}
        return scaled, dh, grads

    return {
        "weight_norm": weight_norm,
        "compose_output_record": compose_output_record,
        "compose_output_backward": compose_output_backward,
    }


def mixed_forward(mixed: MixedKernels) -> Override:
    """The mixed-batch override ``fn(engine, module, layer, x, names)``: every adapter a dense LoRA, no training."""

    def forward(engine: Any, module: str, layer: BaseLayer, x: Array, names: list[str]) -> Any:
        if engine.mode.training or lp_type(layer) not in DENSE or len(names) != x.shape[0]:
            return NotImplemented
        check_adapter_names(names, engine.book.plans, merged=bool(engine.book.merged))
        here = [n for n in dict.fromkeys(names) if n != BASE_ROW and module in engine.book.plans[n].targets]
        adapters = []
        for name in here:
            lp = engine.book.plans[name].layer(module)
            p = engine._layer_params(name, lp)
            if lp.kind != "lora" or not _dense_lora(lp, p):
                return NotImplemented
            if not mixed.accepts(x, p["lora_A.weight"], p["lora_B.weight"]):
                return NotImplemented
            adapters.append((p["lora_A.weight"], p["lora_B.weight"], float(lp.scaling)))
        index = planning.adapter_index(names, here)
        x2 = _rows(x)
        tokens = planning.token_index(index.rows, x2.shape[0] // max(x.shape[0], 1))
        y = layer.forward(x)
        if adapters:
            mixed.run(x2, _rows(y), adapters, tokens)
        return y, {"x": x, "running": []}

    return forward


def lp_type(layer: BaseLayer) -> str:
    return layer.info.type


def kernel_table(low: LowRankKernels, mixed: MixedKernels, dora: DoraKernels) -> KernelTable:
    """The backend's table on these kernel sets."""
    return {
        "lora": lora_overrides(low),
        "adalora": adalora_overrides(low),
        "dora": dora_overrides(low, dora),
        MIXED: {"forward": mixed_forward(mixed)},
    }
