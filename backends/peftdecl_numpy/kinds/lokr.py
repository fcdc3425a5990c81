"""LoKr (LyCORIS): ΔW = s · kron(w1, w2), s = alpha / r even when both factors are full matrices.

w1 is ``lokr_w1`` or w1_a w1_b; w2 is ``lokr_w2``, w2_a w2_b, or the CP rebuild of ``lokr_t2`` for a conv with
``use_effective_conv2d``. As in HF PEFT, w1 is lifted to ``[l, m, 1, 1]`` only when w2 is 4-d. A Conv1d's full
``lokr_w2`` is 3-d, so the product prepends a unit axis to w1 instead ([1, l, m] ⊗ [k, n, s] = [k, l·n, m·s];
torch.kron and np.kron agree) and the reshape to ``[out, in, s]`` interleaves the blocks, as PEFT does.
"""

from __future__ import annotations

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds._weight_delta import (
    Params,
    WeightDeltaOps,
    matmul_grads,
    rebuild_cp,
    rebuild_cp_grads,
)
from peftdecl_numpy.xp_ops import Array, kron, namespace


def kron_grads(a: Array, b: Array, dk: Array) -> tuple[Array, Array]:
    """(dL/da, dL/db) of K = kron(a, b) given dL/dK (operands of unequal rank get leading unit axes)."""
    xp = namespace(a, b, dk)
    nd = max(a.ndim, b.ndim)
    a_full = xp.reshape(a, (1,) * (nd - a.ndim) + tuple(a.shape))
    b_full = xp.reshape(b, (1,) * (nd - b.ndim) + tuple(b.shape))
    # K[i·|b| + j] = a[i] · b[j] along every axis, so K viewed as [a0, b0, a1, b1, ...] is the outer product
    dk = xp.reshape(dk, tuple(d for pair in zip(a_full.shape, b_full.shape, strict=True) for d in pair))
    da = xp.tensordot(dk, b_full, axes=(tuple(range(1, 2 * nd, 2)), tuple(range(nd))))
    db = xp.tensordot(dk, a_full, axes=(tuple(range(0, 2 * nd, 2)), tuple(range(nd))))
    return xp.reshape(da, a.shape), xp.reshape(db, b.shape)


def factor_w1(p: Params) -> Array:
    return p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]


def factor_w2(p: Params) -> Array:
    if "lokr_w2" in p:
        return p["lokr_w2"]
    if "lokr_t2" in p:
        return rebuild_cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    return p["lokr_w2_a"] @ p["lokr_w2_b"]


Tape = tuple[Array, Array, tuple[int, ...]]


def rebuild(lp: LayerPlan, p: Params) -> tuple[Array, Tape]:
    w1, w2 = factor_w1(p), factor_w2(p)
    xp = namespace(w1, w2)
    lifted = xp.reshape(w1, (*w1.shape, 1, 1)) if w2.ndim == 4 else w1
    k = kron(lifted, w2)
    return xp.reshape(lp.scaling * k, lp.layer.weight_shape), (lifted, w2, tuple(k.shape))


def rebuild_grads(lp: LayerPlan, p: Params, tape: Tape, g: Array) -> Params:
    lifted, w2, k_shape = tape
    xp = namespace(g)
    dw1, dw2 = kron_grads(lifted, w2, lp.scaling * xp.reshape(g, k_shape))
    dw1 = xp.reshape(dw1, dw1.shape[:2])  # undo the lift to [l, m, 1, 1]
    grads: dict[str, Array] = {}
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
    "lokr",
    rebuild,
    rebuild_grads,
    renormalises_rank_dropout=lambda lp: bool(lp.options["rank_dropout_scale"]),
)
