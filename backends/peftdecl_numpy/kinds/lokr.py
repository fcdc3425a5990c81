"""LoKr (LyCORIS): ΔW = s · kron(w1, w2), s = alpha / r even when both factors are full matrices.

w1 is ``lokr_w1`` or w1_a w1_b; w2 is ``lokr_w2``, w2_a w2_b, or the CP rebuild of ``lokr_t2`` for a conv with
``use_effective_conv2d``. As in HF PEFT, w1 is lifted to ``[l, m, 1, 1]`` only when w2 is 4-d. A Conv1d's full
``lokr_w2`` is 3-d, so the product prepends a unit axis to w1 instead ([1, l, m] ⊗ [k, n, s] = [k, l·n, m·s];
torch.kron and np.kron agree) and the reshape to ``[out, in, s]`` interleaves the blocks, as PEFT does.
"""

from __future__ import annotations

import numpy as np

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds._weight_delta import (
    Params,
    WeightDeltaOps,
    matmul_grads,
    rebuild_cp,
    rebuild_cp_grads,
)

LAYER_TYPES = ("linear", "conv1d", "conv2d")


def kron_grads(a: np.ndarray, b: np.ndarray, dk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/da, dL/db) of K = kron(a, b) given dL/dK (operands of unequal rank get leading unit axes)."""
    nd = max(a.ndim, b.ndim)
    a_full = a.reshape((1,) * (nd - a.ndim) + a.shape)
    b_full = b.reshape((1,) * (nd - b.ndim) + b.shape)
    # K[i·|b| + j] = a[i] · b[j] along every axis, so K viewed as [a0, b0, a1, b1, ...] is the outer product
    dk = dk.reshape([d for pair in zip(a_full.shape, b_full.shape, strict=True) for d in pair])
    da = np.tensordot(dk, b_full, axes=(list(range(1, 2 * nd, 2)), list(range(nd))))
    db = np.tensordot(dk, a_full, axes=(list(range(0, 2 * nd, 2)), list(range(nd))))
    return da.reshape(a.shape), db.reshape(b.shape)


def factor_w1(p: Params) -> np.ndarray:
    return p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]


def factor_w2(p: Params) -> np.ndarray:
    if "lokr_w2" in p:
        return p["lokr_w2"]
    if "lokr_t2" in p:
        return rebuild_cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    return p["lokr_w2_a"] @ p["lokr_w2_b"]


Tape = tuple[np.ndarray, np.ndarray, tuple[int, ...]]


def delta(lp: LayerPlan, p: Params) -> tuple[np.ndarray, Tape]:
    w1, w2 = factor_w1(p), factor_w2(p)
    lifted = w1[:, :, None, None] if w2.ndim == 4 else w1
    k = np.kron(lifted, w2)
    return (lp.scaling * k).reshape(lp.layer.weight_shape), (lifted, w2, k.shape)


def delta_grads(lp: LayerPlan, p: Params, tape: Tape, g: np.ndarray) -> Params:
    lifted, w2, k_shape = tape
    dw1, dw2 = kron_grads(lifted, w2, lp.scaling * g.reshape(k_shape))
    dw1 = dw1.reshape(dw1.shape[:2])  # undo the lift to [l, m, 1, 1]
    grads: Params = {}
    if "lokr_w1" in p:
        grads["lokr_w1"] = dw1
    else:
        grads["lokr_w1_a"], grads["lokr_w1_b"] = matmul_grads(p["lokr_w1_a"], p["lokr_w1_b"], dw1)
    if "lokr_w2" in p:
        grads["lokr_w2"] = dw2
    elif "lokr_t2" in p:
        grads["lokr_t2"], grads["lokr_w2_a"], grads["lokr_w2_b"] = rebuild_cp_grads(
            p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"], dw2
        )
    else:
        grads["lokr_w2_a"], grads["lokr_w2_b"] = matmul_grads(p["lokr_w2_a"], p["lokr_w2_b"], dw2)
    return grads


# HF PEFT divides LoKr's rank-dropout mask by its mean only with rank_dropout_scale
OPS = WeightDeltaOps(
    "lokr", delta, delta_grads, renormalises_rank_dropout=lambda lp: bool(lp.options["rank_dropout_scale"])
)
