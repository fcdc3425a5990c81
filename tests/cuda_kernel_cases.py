"""Checks of the OFT/BOFT, IA3, VeRA, LoHa/LoKr and 4-bit kernels, for any array namespace that runs them: CuPy on
a device (:mod:`tests.test_cuda_kernels_other`) or NumPy through the CPU emulation of the same sources
(:mod:`tests.test_cuda_kernels_emulated`).

Each check calls the wrapper in :mod:`peftdecl_cupy` on fresh random inputs, outputs filled with NaN before the
launch (an element never written stays NaN and fails the comparison), and compares with the NumPy float64
reference: float32 within 1e-5 and bfloat16 within 2e-2 (relative Frobenius error, :func:`tests.conftest.rel_err`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from peftdecl_cupy import delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels
from tests.conftest import rel_err

F32_TOL, BF16_TOL = 1e-5, 2e-2
RNG = np.random.default_rng


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def dev(xp: Any, a: np.ndarray, dtype: str) -> Any:
    """An activation in ``dtype`` (bfloat16 as uint16 bits)."""
    return xp.asarray(to_bf16(a) if dtype == "bf16" else np.asarray(a, np.float32))


def f32(xp: Any, a: Any) -> Any:
    return xp.asarray(np.asarray(a, np.float32))


def host(xp: Any, a: Any) -> np.ndarray:
    out = xp.asnumpy(a) if hasattr(xp, "asnumpy") else np.asarray(a)
    return from_bf16(out) if out.dtype == np.uint16 else out.astype(np.float64)


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """What the kernel reads: ``a`` rounded to ``dtype``, as float64."""
    return (from_bf16(to_bf16(a)) if dtype == "bf16" else np.asarray(a, np.float32)).astype(np.float64)


def poisoned(xp: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if dtype == "bf16":
        return xp.full(shape, 0x7FC0, dtype=np.uint16)
    return xp.full(shape, np.nan, dtype=np.float32)


def tol(dtype: str) -> float:
    return BF16_TOL if dtype == "bf16" else F32_TOL


# -- OFT ------------------------------------------------------------------------------------------------------
def check_rotate_blocks(
    xp: Any, dtype: str, rows: int, n: int, b: int, shared: bool, transpose: bool
) -> None:
    rng = RNG(rows * n + b)
    x = rng.standard_normal((rows, n * b))
    r = rng.standard_normal((1 if shared else n, b, b))
    out = poisoned(xp, (rows, n * b), dtype)
    rotation_kernels.rotate_blocks(dev(xp, x, dtype), f32(xp, r), transpose, out=out)
    rr = np.broadcast_to(rounded(r, "f32"), (n, b, b))
    rr = rr.transpose(0, 2, 1) if transpose else rr
    want = np.einsum("tnk,nkc->tnc", rounded(x, dtype).reshape(rows, n, b), rr).reshape(rows, -1)
    assert rel_err(host(xp, out), want) <= tol(dtype)


def check_block_tn(xp: Any, dtype: str, rows: int, n: int, b: int) -> None:
    rng = RNG(rows + b)
    x, g = rng.standard_normal((rows, n * b)), rng.standard_normal((rows, n * b))
    got = rotation_kernels.block_tn(dev(xp, x, dtype), dev(xp, g, dtype), b)
    xs, gs = rounded(x, dtype).reshape(rows, n, b), rounded(g, dtype).reshape(rows, n, b)
    assert (
        rel_err(host(xp, got), np.einsum("tnk,tnc->nkc", xs, gs)) <= F32_TOL
    )  # float32 sums of exact products


def skew(rng: np.random.Generator, m: int, b: int, size: float) -> np.ndarray:
    u = rng.standard_normal((m, b, b)) * size
    return rounded(u - u.transpose(0, 2, 1), "f32")


def check_cayley(xp: Any, b: int) -> None:
    from peftdecl_numpy.rotation import cayley

    s = skew(RNG(b), 5, b, 0.2)
    out = poisoned(xp, (5, b, b), "f32")
    rotation_kernels.skew_solve(f32(xp, s), f32(xp, np.eye(b) - s), 1.0, out=out)
    assert rel_err(host(xp, out), cayley(s)) <= F32_TOL


def check_neumann(xp: Any, terms: int, b: int) -> None:
    from peftdecl.plan.kinds.oft import neumann_coefficients
    from peftdecl_numpy.rotation import neumann

    q = skew(RNG(terms * b), 3, b, 0.3 / b**0.5)
    out = poisoned(xp, (3, b, b), "f32")
    rotation_kernels.neumann(f32(xp, q), neumann_coefficients(terms), out=out)
    assert rel_err(host(xp, out), neumann(q, terms)) <= F32_TOL


# -- BOFT -----------------------------------------------------------------------------------------------------
def check_butterfly(xp: Any, dtype: str, rows: int, width: int, blocks: int, size: int, factors: int) -> None:
    """Forward through every factor (the last first) and, in float32, the backward: factor 0 first with the
    transposed blocks, dQ from each factor's input; against the reference's butterfly and its backward."""
    from peftdecl.plan.kinds.boft import butterfly_perms
    from peftdecl_numpy.kinds.boft import butterfly, butterfly_backward

    rng = RNG(width + factors)
    perms = butterfly_perms(width, blocks, size, factors)
    x, q = rng.standard_normal((rows, width)), rng.standard_normal((factors, blocks, size, size))
    g = rng.standard_normal((rows, width))
    idx = [
        None if np.array_equal(p, np.arange(width)) else xp.asarray(np.argsort(p).astype(np.int32))
        for p in perms
    ]
    qd = f32(xp, q)
    current = dev(xp, x, dtype)
    for i in reversed(range(factors)):
        current = rotation_kernels.butterfly_factor(
            current, qd[i], idx[i], False, out=poisoned(xp, x.shape, dtype)
        )
    qr = rounded(q, "f32")
    want, inputs = butterfly(rounded(x, dtype), qr, perms)
    # bfloat16 rounds after every factor: one rounding's tolerance per factor
    assert rel_err(host(xp, current), want) <= tol(dtype) * (factors if dtype == "bf16" else 1)
    if dtype != "f32":
        return
    grad = dev(xp, g, dtype)
    want_dx, want_dq = butterfly_backward(inputs, qr, perms, g)
    dq = []
    for i in range(factors):
        factor_input = inputs[i][
            :, perms[i]
        ]  # the reference keeps x P_i; the kernel reads x and permutes itself
        dq.append(
            host(xp, rotation_kernels.butterfly_factor_tn(dev(xp, factor_input, dtype), grad, idx[i], size))
        )
        grad = rotation_kernels.butterfly_factor(grad, qd[i], idx[i], True, out=poisoned(xp, x.shape, dtype))
    assert rel_err(host(xp, grad), want_dx) <= F32_TOL
    assert rel_err(np.stack(dq), want_dq) <= F32_TOL


# -- IA3 and VeRA ---------------------------------------------------------------------------------------------
def check_scale_columns(xp: Any, dtype: str, rows: int, d: int) -> None:
    rng = RNG(rows + d)
    y, dy, scale = rng.standard_normal((rows, d)), rng.standard_normal((rows, d)), rng.standard_normal(d)
    out = poisoned(xp, (rows, d), dtype)
    scaling_kernels.scale_columns(dev(xp, y, dtype), f32(xp, scale), out=out)
    ys, dys, ls = rounded(y, dtype), rounded(dy, dtype), rounded(scale, "f32")
    assert rel_err(host(xp, out), ys * ls) <= tol(dtype)
    dy_scaled, dl = scaling_kernels.scale_columns_backward(
        dev(xp, dy, dtype), dev(xp, y, dtype), f32(xp, scale), dy_scaled=poisoned(xp, (rows, d), dtype)
    )
    assert rel_err(host(xp, dy_scaled), dys * ls) <= tol(dtype)
    assert rel_err(host(xp, dl), (dys * ys).sum(0)) <= F32_TOL  # float32 sums of exact products


def check_lowrank_add(xp: Any, dtype: str, rows: int, cols: int, rank: int) -> None:
    """VeRA's expand y + (u ⊙ λ_d)(λ_b ⊙ B)ᵀ with B a strided slice of the shared matrix, and the merge form
    W + diag(sm) P Q in place."""
    rng = RNG(rows * cols + rank)
    base, u = rng.standard_normal((rows, cols)), rng.standard_normal((rows, rank))
    shared_b = rng.standard_normal((cols + 3, rank + 2))
    lam_d, lam_b = rng.standard_normal(rank), rng.standard_normal(cols)
    b_view = f32(xp, shared_b)[:cols, :rank]
    out = poisoned(xp, (rows, cols), dtype)
    scaling_kernels.lowrank_add(
        dev(xp, base, dtype), f32(xp, u), b_view.T, sn=f32(xp, lam_b), sk=f32(xp, lam_d), out=out
    )
    b32, u32 = rounded(shared_b[:cols, :rank], "f32"), rounded(u, "f32")
    want = rounded(base, dtype) + ((u32 * rounded(lam_d, "f32")) @ b32.T) * rounded(lam_b, "f32")
    assert rel_err(host(xp, out), want) <= tol(dtype)
    q = rng.standard_normal((rank, cols))
    w = dev(xp, base, dtype)
    scaling_kernels.lowrank_add(w, f32(xp, u), f32(xp, q), sm=f32(xp, np.full(rows, 0.5)), out=w)
    assert rel_err(host(xp, w), rounded(base, dtype) + 0.5 * u32 @ rounded(q, "f32")) <= tol(dtype)


# -- LoHa and LoKr --------------------------------------------------------------------------------------------
def check_loha(xp: Any, dtype: str, out_f: int, in_f: int, r1: int, r2: int) -> None:
    rng = RNG(out_f + in_f + r1)
    a1, b1 = rng.standard_normal((out_f, r1)) / r1**0.5, rng.standard_normal((r1, in_f))
    a2, b2 = rng.standard_normal((out_f, r2)) / r2**0.5, rng.standard_normal((r2, in_f))
    g = rng.standard_normal((out_f, in_f))
    args = [dev(xp, t, dtype) for t in (a1, b1, a2, b2)]
    got = delta_kernels.loha_delta(*args, 0.75, out=poisoned(xp, (out_f, in_f), dtype))
    a1r, b1r, a2r, b2r, gr = (rounded(t, dtype) for t in (a1, b1, a2, b2, g))
    p1, p2 = a1r @ b1r, a2r @ b2r
    assert rel_err(host(xp, got), 0.75 * p1 * p2) <= tol(dtype)
    dp1, dp2 = delta_kernels.loha_backward(
        dev(xp, g, dtype),
        *args,
        0.75,
        dp1=poisoned(xp, (out_f, in_f), dtype),
        dp2=poisoned(xp, (out_f, in_f), dtype),
    )
    assert rel_err(host(xp, dp1), 0.75 * gr * p2) <= tol(dtype)
    assert rel_err(host(xp, dp2), 0.75 * gr * p1) <= tol(dtype)


def check_kron(xp: Any, dtype: str, m1: int, n1: int, p: int, q: int) -> None:
    from peftdecl_numpy.kinds.lokr import kron_grads

    rng = RNG(m1 * n1 + p * q)
    w1, w2 = rng.standard_normal((m1, n1)), rng.standard_normal((p, q))
    g = rng.standard_normal((m1 * p, n1 * q))
    w1d, w2d = dev(xp, w1, dtype), dev(xp, w2, dtype)
    got = delta_kernels.kron_delta(w1d, w2d, 0.5, out=poisoned(xp, (m1 * p, n1 * q), dtype))
    w1r, w2r, gr = rounded(w1, dtype), rounded(w2, dtype), rounded(g, dtype)
    assert rel_err(host(xp, got), 0.5 * np.kron(w1r, w2r)) <= tol(dtype)
    dw1, dw2 = delta_kernels.kron_backward(
        dev(xp, g, dtype), w1d, w2d, 0.5, dw1=poisoned(xp, (m1, n1), dtype), dw2=poisoned(xp, (p, q), dtype)
    )
    want1, want2 = kron_grads(w1r, w2r, 0.5 * gr)
    assert rel_err(host(xp, dw1), want1) <= tol(dtype)
    assert rel_err(host(xp, dw2), want2) <= tol(dtype)


# -- 4-bit ------------------------------------------------------------------------------------------------------
def dequant_reference(
    codes: np.ndarray, absmax: np.ndarray, table: np.ndarray, blocksize: int, n: int
) -> Any:
    """bitsandbytes' layout: the high nibble of byte e // 2 for even e, the low one for odd e."""
    e = np.arange(n)
    nibble = np.where(e % 2 == 0, codes[e // 2] >> 4, codes[e // 2] & 15)
    return table[nibble].astype(np.float64) * absmax[e // blocksize]


def check_nf4(xp: Any, dtype: str, rows: int, cols: int, blocksize: int, rank: int) -> None:
    rng = RNG(rows + cols)
    n = rows * cols
    codes = rng.integers(0, 256, size=(n + 1) // 2, dtype=np.uint8)
    absmax = rng.random(-(-n // blocksize)).astype(np.float32) + 0.1
    table = np.sort(rng.uniform(-1, 1, 16)).astype(np.float32)
    want = dequant_reference(codes, absmax, table, blocksize, n).reshape(rows, cols)
    out = poisoned(xp, (rows, cols), dtype)
    nf4_kernels.nf4_dequant(xp.asarray(codes), f32(xp, absmax), f32(xp, table), blocksize, out)
    assert rel_err(host(xp, out), want) <= tol(dtype)
    b, a = rng.standard_normal((rows, rank)), rng.standard_normal((rank, cols))
    out = poisoned(xp, (rows, cols), dtype)
    nf4_kernels.nf4_lowrank(
        xp.asarray(codes), f32(xp, absmax), f32(xp, table), blocksize, f32(xp, b), f32(xp, a), 0.5, out
    )
    assert rel_err(host(xp, out), want + 0.5 * rounded(b, "f32") @ rounded(a, "f32")) <= tol(dtype)
    q = rng.integers(0, 256, size=absmax.size, dtype=np.uint8)
    code2 = rng.standard_normal(256).astype(np.float32)
    absmax2 = rng.random(-(-q.size // 256)).astype(np.float32) + 0.1
    got = nf4_kernels.absmax_dequant(xp.asarray(q), f32(xp, code2), f32(xp, absmax2), 0.25, 256)
    want_scales = code2[q].astype(np.float64) * absmax2[np.arange(q.size) // 256] + 0.25
    assert rel_err(host(xp, got), want_scales) <= F32_TOL
