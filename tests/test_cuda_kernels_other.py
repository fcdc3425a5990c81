"""The OFT/BOFT, IA3, VeRA, LoHa/LoKr and 4-bit kernels on a CUDA device (skipped without one).

Each kernel against the NumPy float64 reference on fresh random inputs, outputs filled with NaN before the launch
(an element the kernel never writes stays NaN and fails the comparison), odd sizes and the block/rank limits;
float32 within 1e-5 and bfloat16 within 2e-2 (relative Frobenius error, :func:`tests.conftest.rel_err`). Then the
torch hooks on CUDA tensors: forward and gradients of each hooked function with the kernels against torch autograd
of the same formula in float64 with the kernels switched off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from tests.conftest import rel_err

cupy = pytest.importorskip("cupy")

from peftdecl_cupy._device import unavailable_reason  # noqa: E402

_WHY = unavailable_reason()
if _WHY:
    pytest.skip(f"no CUDA device for the kernels: {_WHY}", allow_module_level=True)

from peftdecl_cupy import delta_kernels, nf4_kernels, rotation_kernels, scaling_kernels  # noqa: E402

F32_TOL, BF16_TOL = 1e-5, 2e-2
DTYPES = ["f32", "bf16"]
RNG = np.random.default_rng


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def device(a: np.ndarray, dtype: str) -> Any:
    """An activation on the device in ``dtype`` (bfloat16 as uint16 bits)."""
    return cupy.asarray(to_bf16(a) if dtype == "bf16" else np.asarray(a, np.float32))


def host(a: Any) -> np.ndarray:
    out = cupy.asnumpy(a)
    return from_bf16(out) if out.dtype == np.uint16 else out.astype(np.float64)


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """What the kernel reads: ``a`` rounded to ``dtype``, as float64."""
    return (from_bf16(to_bf16(a)) if dtype == "bf16" else np.asarray(a, np.float32)).astype(np.float64)


def poisoned(shape: tuple[int, ...], dtype: str) -> Any:
    if dtype == "bf16":
        return cupy.full(shape, 0x7FC0, dtype=cupy.uint16)
    return cupy.full(shape, np.nan, dtype=cupy.float32)


def f32(a: np.ndarray) -> Any:
    return cupy.asarray(np.asarray(a, np.float32))


def tol(dtype: str) -> float:
    return BF16_TOL if dtype == "bf16" else F32_TOL


# -- OFT ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "n", "b", "shared"), [(37, 3, 5, False), (5, 2, 64, False), (300, 7, 1, True)]
)
@pytest.mark.parametrize("transpose", [False, True])
def test_rotate_blocks(dtype: str, rows: int, n: int, b: int, shared: bool, transpose: bool) -> None:
    rng = RNG(rows * n + b)
    x = rng.standard_normal((rows, n * b))
    r = rng.standard_normal((1 if shared else n, b, b))
    out = poisoned((rows, n * b), dtype)
    rotation_kernels.rotate_blocks(device(x, dtype), f32(r), transpose, out=out)
    rr = np.broadcast_to(r, (n, b, b)).astype(np.float32).astype(np.float64)
    rr = rr.transpose(0, 2, 1) if transpose else rr
    want = np.einsum("tnk,nkc->tnc", rounded(x, dtype).reshape(rows, n, b), rr).reshape(rows, -1)
    assert rel_err(host(out), want) <= tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n", "b"), [(2500, 3, 7), (9, 2, 64)])
def test_block_tn(dtype: str, rows: int, n: int, b: int) -> None:
    rng = RNG(rows + b)
    x, g = rng.standard_normal((rows, n * b)), rng.standard_normal((rows, n * b))
    got = rotation_kernels.block_tn(device(x, dtype), device(g, dtype), b)
    xs, gs = rounded(x, dtype).reshape(rows, n, b), rounded(g, dtype).reshape(rows, n, b)
    assert rel_err(host(got), np.einsum("tnk,tnc->nkc", xs, gs)) <= F32_TOL  # float32 sums of exact products


@pytest.mark.parametrize("b", [1, 7, 32, 64])
def test_cayley_by_skew_solve(b: int) -> None:
    from peftdecl_numpy.rotation import cayley

    rng = RNG(b)
    u = rng.standard_normal((5, b, b)) * 0.2
    s = (u - u.transpose(0, 2, 1)).astype(np.float32).astype(np.float64)
    rhs = np.eye(b) - s
    out = cupy.full((5, b, b), np.nan, dtype=cupy.float32)
    rotation_kernels.skew_solve(f32(s), f32(rhs), 1.0, out=out)
    assert rel_err(host(out), cayley(s)) <= F32_TOL


@pytest.mark.parametrize(("terms", "b"), [(1, 4), (5, 9), (8, 64)])
def test_neumann(terms: int, b: int) -> None:
    from peftdecl.plan.kinds.oft import neumann_coefficients
    from peftdecl_numpy.rotation import neumann

    rng = RNG(terms * b)
    u = rng.standard_normal((3, b, b)) * (0.3 / b**0.5)
    q = (u - u.transpose(0, 2, 1)).astype(np.float32).astype(np.float64)
    out = cupy.full((3, b, b), np.nan, dtype=cupy.float32)
    rotation_kernels.neumann(f32(q), neumann_coefficients(terms), out=out)
    assert rel_err(host(out), neumann(q, terms)) <= F32_TOL


# -- BOFT -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("width", "blocks", "size", "factors"), [(24, 6, 4, 2), (64, 8, 8, 4), (40, 5, 8, 1)]
)
def test_butterfly_factors_against_the_reference(
    dtype: str, width: int, blocks: int, size: int, factors: int
) -> None:
    from peftdecl.plan.kinds.boft import butterfly_perms
    from peftdecl_numpy.kinds.boft import butterfly, butterfly_backward

    rng = RNG(width + factors)
    perms = butterfly_perms(width, blocks, size, factors)
    x, q, g = rng.standard_normal((33, width)), rng.standard_normal((factors, blocks, size, size)), None
    g = rng.standard_normal((33, width))
    idx = [
        None if np.array_equal(p, np.arange(width)) else cupy.asarray(np.argsort(p).astype(np.int32))
        for p in perms
    ]
    qd = f32(q)
    current = device(x, dtype)
    for i in reversed(range(factors)):  # forward: the last factor first, as the reference
        out = poisoned((33, width), dtype)
        current = rotation_kernels.butterfly_factor(current, qd[i], idx[i], False, out=out)
    qr = q.astype(np.float32).astype(np.float64)
    want, inputs = butterfly(rounded(x, dtype), qr, perms)
    # bfloat16 rounds between factors: the tolerance covers one rounding per factor
    assert rel_err(host(current), want) <= tol(dtype) * max(1, factors if dtype == "bf16" else 1)
    if dtype == "f32":  # backward: factor 0 first, with the transposed blocks; dQ from each factor's input
        grad = device(g, dtype)
        want_dx, want_dq = butterfly_backward(inputs, qr, perms, g)
        dq = []
        for i in range(factors):
            dq.append(
                host(rotation_kernels.butterfly_factor_tn(device(inputs[i], dtype), grad, idx[i], size))
            )
            grad = rotation_kernels.butterfly_factor(
                grad, qd[i], idx[i], True, out=poisoned((33, width), dtype)
            )
        assert rel_err(host(grad), want_dx) <= F32_TOL
        assert rel_err(np.stack(dq), want_dq) <= F32_TOL


# -- IA3 and VeRA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d"), [(1030, 45), (3, 4096)])
def test_scale_columns_and_backward(dtype: str, rows: int, d: int) -> None:
    rng = RNG(rows + d)
    y, dy, scale = rng.standard_normal((rows, d)), rng.standard_normal((rows, d)), rng.standard_normal(d)
    out = poisoned((rows, d), dtype)
    scaling_kernels.scale_columns(device(y, dtype), f32(scale), out=out)
    ys, dys, ls = rounded(y, dtype), rounded(dy, dtype), rounded(scale, "f32")
    assert rel_err(host(out), ys * ls) <= tol(dtype)
    dy_scaled, dl = scaling_kernels.scale_columns_backward(
        device(dy, dtype), device(y, dtype), f32(scale), dy_scaled=poisoned((rows, d), dtype)
    )
    assert rel_err(host(dy_scaled), dys * ls) <= tol(dtype)
    assert rel_err(host(dl), (dys * ys).sum(0)) <= F32_TOL  # float32 sums of exact products


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols", "rank"), [(70, 33, 19), (129, 257, 256), (1, 5, 1)])
def test_lowrank_add_vera_expand_and_merge(dtype: str, rows: int, cols: int, rank: int) -> None:
    rng = RNG(rows * cols + rank)
    base, u = rng.standard_normal((rows, cols)), rng.standard_normal((rows, rank))
    shared_b = rng.standard_normal((cols + 3, rank + 2))  # VeRA's shared B, sliced [:cols, :rank] in place
    lam_d, lam_b = rng.standard_normal(rank), rng.standard_normal(cols)
    b_view = f32(shared_b)[:cols, :rank]
    out = poisoned((rows, cols), dtype)
    scaling_kernels.lowrank_add(device(base, dtype), f32(u), b_view.T, sn=f32(lam_b), sk=f32(lam_d), out=out)
    b32 = rounded(shared_b[:cols, :rank], "f32")
    want = rounded(base, dtype) + ((rounded(u, "f32") * rounded(lam_d, "f32")) @ b32.T) * rounded(
        lam_b, "f32"
    )
    assert rel_err(host(out), want) <= tol(dtype)
    # the merge form: W + diag(sm) P Q with sm on the rows, in place on the base
    w = device(base, dtype)
    scaling_kernels.lowrank_add(w, f32(u), f32(u.T @ base)[:, :cols], sm=f32(np.ones(rows) * 0.5), out=w)
    want_merge = rounded(base, dtype) + 0.5 * rounded(u, "f32") @ rounded(u.T @ base, "f32")
    assert rel_err(host(w), want_merge) <= tol(dtype)


# -- LoHa and LoKr --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("out_f", "in_f", "r1", "r2"), [(37, 29, 3, 5), (64, 300, 256, 1)])
def test_loha_delta_and_backward(dtype: str, out_f: int, in_f: int, r1: int, r2: int) -> None:
    rng = RNG(out_f + in_f + r1)
    a1, b1 = rng.standard_normal((out_f, r1)) / r1**0.5, rng.standard_normal((r1, in_f))
    a2, b2 = rng.standard_normal((out_f, r2)) / r2**0.5, rng.standard_normal((r2, in_f))
    g = rng.standard_normal((out_f, in_f))
    args = [device(t, dtype) for t in (a1, b1, a2, b2)]
    got = delta_kernels.loha_delta(*args, 0.75, out=poisoned((out_f, in_f), dtype))
    a1r, b1r, a2r, b2r, gr = (rounded(t, dtype) for t in (a1, b1, a2, b2, g))
    p1, p2 = a1r @ b1r, a2r @ b2r
    assert rel_err(host(got), 0.75 * p1 * p2) <= tol(dtype)
    dp1, dp2 = delta_kernels.loha_backward(device(g, dtype), *args, 0.75)
    assert rel_err(host(dp1), 0.75 * gr * p2) <= tol(dtype)
    assert rel_err(host(dp2), 0.75 * gr * p1) <= tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m1", "n1", "p", "q"), [(3, 4, 5, 7), (1, 1, 64, 64), (16, 16, 1, 3)])
def test_kron_delta_and_backward(dtype: str, m1: int, n1: int, p: int, q: int) -> None:
    from peftdecl_numpy.kinds.lokr import kron_grads

    rng = RNG(m1 * n1 + p * q)
    w1, w2, g = (
        rng.standard_normal((m1, n1)),
        rng.standard_normal((p, q)),
        rng.standard_normal((m1 * p, n1 * q)),
    )
    got = delta_kernels.kron_delta(
        device(w1, dtype), device(w2, dtype), 0.5, out=poisoned((m1 * p, n1 * q), dtype)
    )
    w1r, w2r, gr = rounded(w1, dtype), rounded(w2, dtype), rounded(g, dtype)
    assert rel_err(host(got), 0.5 * np.kron(w1r, w2r)) <= tol(dtype)
    dw1, dw2 = delta_kernels.kron_backward(device(g, dtype), device(w1, dtype), device(w2, dtype), 0.5)
    want1, want2 = kron_grads(w1r, w2r, 0.5 * gr)
    assert rel_err(host(dw1), want1) <= tol(dtype)
    assert rel_err(host(dw2), want2) <= tol(dtype)


# -- 4-bit ------------------------------------------------------------------------------------------------------
def dequant_reference(
    codes: np.ndarray, absmax: np.ndarray, table: np.ndarray, blocksize: int, n: int
) -> Any:
    e = np.arange(n)
    nibble = np.where(e % 2 == 0, codes[e // 2] >> 4, codes[e // 2] & 15)
    return table[nibble].astype(np.float64) * absmax[e // blocksize]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols", "blocksize", "rank"), [(48, 128, 64, 16), (7, 30, 32, 1)])
def test_nf4_dequant_and_lowrank(dtype: str, rows: int, cols: int, blocksize: int, rank: int) -> None:
    rng = RNG(rows + cols)
    n = rows * cols
    codes = rng.integers(0, 256, size=(n + 1) // 2, dtype=np.uint8)
    absmax = rng.random(-(-n // blocksize)).astype(np.float32) + 0.1
    table = np.sort(rng.uniform(-1, 1, 16)).astype(np.float32)
    want = dequant_reference(codes, absmax, table, blocksize, n).reshape(rows, cols)
    out = poisoned((rows, cols), dtype)
    nf4_kernels.nf4_dequant(cupy.asarray(codes), f32(absmax), f32(table), blocksize, out)
    assert rel_err(host(out), want) <= tol(dtype)
    b, a = rng.standard_normal((rows, rank)), rng.standard_normal((rank, cols))
    out = poisoned((rows, cols), dtype)
    nf4_kernels.nf4_lowrank(cupy.asarray(codes), f32(absmax), f32(table), blocksize, f32(b), f32(a), 0.5, out)
    assert rel_err(host(out), want + 0.5 * rounded(b, "f32") @ rounded(a, "f32")) <= tol(dtype)
    q = rng.integers(0, 256, size=absmax.size, dtype=np.uint8)
    code2, absmax2 = rng.standard_normal(256).astype(np.float32), rng.random(2).astype(np.float32)
    got = nf4_kernels.absmax_dequant(cupy.asarray(q), f32(code2), f32(absmax2), 0.25, 256)
    want_scales = code2[q].astype(np.float64) * absmax2[np.arange(q.size) // 256] + 0.25
    assert rel_err(host(got), want_scales) <= F32_TOL


# -- the torch hooks on CUDA tensors: kernels on vs torch autograd of the formula in float64, kernels off ---------
torch = pytest.importorskip("torch")

from peftdecl_torch import cuda_kernels  # noqa: E402


@pytest.fixture
def switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool], None]]:
    def set_kernels(on: bool) -> None:
        monkeypatch.setenv(cuda_kernels.ENV, "1" if on else "0")
        cuda_kernels.refresh()

    yield set_kernels
    cuda_kernels.refresh()


def hooked_cases() -> dict[str, tuple[Callable[..., Any], Callable[[torch.Generator], tuple[Any, ...]]]]:
    from peftdecl_torch.kinds import _rotation as rot

    def skew(g: torch.Generator, *shape: int) -> Any:
        u = torch.randn(*shape, generator=g) * 0.2
        return u - u.transpose(-1, -2)

    perms = rot.butterfly_perms(48, 6, 8, 2, torch.device("cuda"))
    return {
        "rotate_blocks": (
            rot.rotate_blocks,
            lambda g: (torch.randn(2, 37, 45, generator=g), torch.randn(3, 15, 15, generator=g)),
        ),
        "butterfly": (
            lambda x, q: rot.butterfly(x, q, perms),
            lambda g: (torch.randn(3, 11, 48, generator=g), torch.randn(2, 6, 8, 8, generator=g)),
        ),
        "cayley": (rot.cayley, lambda g: (skew(g, 2, 3, 9, 9),)),
        "neumann": (lambda q: rot.neumann(q, 6), lambda g: (skew(g, 4, 16, 16),)),
    }


@pytest.mark.parametrize("case", ["rotate_blocks", "butterfly", "cayley", "neumann"])
def test_hooked_functions_forward_and_gradients(case: str, switch: Callable[[bool], None]) -> None:
    function, make = hooked_cases()[case]
    inputs = make(torch.Generator().manual_seed(0))
    weights = torch.Generator().manual_seed(1)

    def run(dtype: torch.dtype) -> tuple[Any, list[Any]]:
        args = [t.to("cuda", dtype).requires_grad_(True) for t in inputs]
        y = function(*args)
        w = torch.randn(y.shape, generator=weights.manual_seed(1)).to("cuda", dtype)
        (y * w).sum().backward()
        return y.detach().double().cpu(), [a.grad.double().cpu() for a in args]

    switch(True)
    y, grads = run(torch.float32)
    switch(False)
    y_ref, grads_ref = run(torch.float64)
    assert rel_err(y.numpy(), y_ref.numpy()) <= F32_TOL
    for got, want in zip(grads, grads_ref, strict=True):
        assert rel_err(got.numpy(), want.numpy()) <= F32_TOL
