"""Dense float32 products on the CPU through the faster of the two GEMM libraries torch ships.

torch runs float32 CPU matmuls through its BLAS (MKL on x86 wheels), which picks its kernels by CPU vendor and
runs markedly slower on x86 CPUs not made by Intel than oneDNN, which torch also bundles (as "mkldnn"): on the
2-core AMD EPYC this project's CI runs on, x Wᵀ for 2048 × 1024 × 1024 takes 9.5 ms through oneDNN against
20 ms through MKL, a rank-16 product 0.26 against 0.40 ms, and a rank-16 weight gradient (T = 2048) 0.26 against
0.80 ms. Results agree to float32 rounding (≈ 3e-7 relative).

``ENGINE`` picks the library for the products peftdecl's layers compute themselves:

- ``"auto"`` (default): oneDNN on an x86 CPU whose vendor is not Intel, when torch has it; BLAS otherwise;
- ``"onednn"``: oneDNN wherever torch has it; ``"blas"``: torch's own matmul everywhere.

The environment variable ``PEFTDECL_CPU_GEMM`` sets the default. Only float32 CPU products of at least
``MIN_WORK`` multiply-adds use oneDNN (its per-call set-up costs ~10 µs, more than a tiny product). The base
layers peftdecl does not adapt, and everything off the CPU, keep torch's own path.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

ENGINES = ("auto", "onednn", "blas")
ENGINE = os.environ.get("PEFTDECL_CPU_GEMM", "auto")
MIN_WORK = 1 << 22
"""Smallest product (rows × inner × columns multiply-adds) sent to oneDNN: around 2^21 the two libraries are even
on the CI machine (2 × 1024 × 1024: 0.12 against 0.11 ms), above it oneDNN takes 0.33–0.41 of BLAS's time."""


KNOWN_VENDORS = ("GenuineIntel", "AuthenticAMD", "HygonGenuine")


@lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The x86 vendor string (e.g. ``AuthenticAMD``): /proc/cpuinfo on Linux, the processor description
    elsewhere (Windows names the vendor there), "" where neither says."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    description = platform.processor()
    return next((vendor for vendor in KNOWN_VENDORS if vendor in description), "")


@lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear operator and it computes x wᵀ + b for transposed (strided)
    operands, as the callers here pass them."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    x = torch.arange(6.0).reshape(3, 2).t()  # [2, 3], strided
    w = torch.arange(12.0).reshape(3, 4).t()  # [4, 3], strided
    bias = torch.arange(4.0)
    try:
        probe = torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool(probe.shape == (2, 4) and torch.equal(probe, torch.addmm(bias, x, w.t())))


def use_onednn() -> bool:
    """Whether ``ENGINE`` sends CPU float32 products to oneDNN on this machine."""
    return _decide(ENGINE)


@lru_cache(maxsize=len(ENGINES))
def _decide(engine: str) -> bool:
    if engine not in ENGINES:
        raise ValueError(f"PEFTDECL_CPU_GEMM / gemm.ENGINE: expected one of {ENGINES}, got {engine!r}")
    if engine == "blas" or not onednn_available():
        return False
    if engine == "onednn":
        return True
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    vendor = cpu_vendor()
    return x86 and vendor != "" and vendor != "GenuineIntel"


def takes_over(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether an adapted layer may compute its base ``module`` on ``x`` itself (:func:`linear` on its weight):
    oneDNN is in use, x is a float32 CPU tensor, and the module is exactly torch's Linear or transformers' Conv1D,
    with no hooks that calling it would run."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    cls = type(module)
    plain = cls is torch.nn.Linear or (
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
    )
    if not plain or not use_onednn():
        return False
    hooks = torch.nn.modules.module
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def routes_to_onednn(rows: int, inner: int, cols: int, *tensors: torch.Tensor) -> bool:
    """Whether a rows × inner × cols product of ``tensors`` runs through oneDNN."""
    if rows * inner * cols < MIN_WORK or rows == 0:
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    # under CPU autocast torch's own ops lower precision, and torch.func transforms need torch's own derivatives
    if torch.is_autocast_enabled("cpu") or _functorch_active():
        return False
    return use_onednn()


def _functorch_active() -> bool:
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


def _onednn(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, w, bias, "none", [], "")


class LinearFunction(torch.autograd.Function):
    """y = x wᵀ + b with every product through oneDNN: dx = dy w, dw = dyᵀ x, db = Σ_t dy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: Any) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x if w.requires_grad else None, w if x.requires_grad else None)
        return _onednn(x2, w, bias).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        # create_graph=True (grad mode on here): recorded torch products, so that second derivatives hold
        recorded = torch.is_grad_enabled()
        dx = dw = db = None
        if need_x:
            dx = (torch.mm(dy2, w) if recorded else mm(dy2, w)).view(*dy.shape[:-1], w.shape[1])
        if need_w:
            x2 = x.reshape(-1, x.shape[-1])
            dw = dy2.t() @ x2 if recorded else tn(dy2, x2)
        if need_b:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x wᵀ + b for x [..., in] and w [out, in] (any strides), differentiable; F.linear where oneDNN is not used."""
    rows = x.numel() // max(x.shape[-1], 1)
    tensors = (x, w) if bias is None else (x, w, bias)
    if x.ndim == 0 or not routes_to_onednn(rows, w.shape[1], w.shape[0], *tensors):
        return F.linear(x, w, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return LinearFunction.apply(x, w, bias)
    x2 = x.reshape(-1, x.shape[-1])
    return _onednn(x2, w, bias).view(*x.shape[:-1], w.shape[0])


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · b for 2-D a [m, k], b [k, n], outside autograd (inside a Function's forward or backward)."""
    if routes_to_onednn(a.shape[0], a.shape[1], b.shape[1], a, b):
        return _onednn(a, b.t(), None)
    return torch.mm(a, b)


def addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """c + alpha · a b (a merged weight W + s·B A), outside autograd; a new tensor."""
    if routes_to_onednn(a.shape[0], a.shape[1], b.shape[1], a, b, c):
        product = _onednn(a, b.t(), None)
        return torch.add(c, product, alpha=alpha, out=product)
    return torch.addmm(c, a, b, alpha=alpha)


def tn(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ · right for left [T, m], right [T, n] (a weight gradient), outside autograd."""
    if routes_to_onednn(left.shape[1], left.shape[0], right.shape[1], left, right):
        # oneDNN reads a strided input slowly (0.48 against 0.27 ms for a rank-16 left at T = 2048): a thin one is
        # copied first; a wide one is cheaper to read in place than to transpose
        lhs = left.t().contiguous() if 8 * left.shape[1] <= right.shape[1] else left.t()
        return _onednn(lhs, right.t(), None)
    return left.t() @ right
