"""The kernel object on CUDA tensors: torch tensors handed to the CuPy kernels through DLPack, no copies.

Outputs are allocated by torch (its caching allocator owns them) and written through CuPy views; every launch
runs on torch's current stream of the tensor's device, so kernels order with the torch work around them.
bfloat16 tensors are viewed as int16 for DLPack (CuPy has no bfloat16 dtype) and read as uint16 bits by the
kernels. Rotations, scales and VeRA factors are float32; activations float32 or bfloat16.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from peftdecl_cupy import delta_kernels, nf4_kernels, planning, rotation_kernels, scaling_kernels
from peftdecl_cupy.dora import CupyDora
from peftdecl_cupy.lowrank import CupyLowRank
from peftdecl_cupy.mixed import CupyMixed


def _cupy() -> Any:
    import cupy

    return cupy


def from_dlpack(t: torch.Tensor) -> Any:
    """The CuPy array sharing ``t``'s memory (DLPack)."""
    return _cupy().from_dlpack(t)


def view(t: torch.Tensor | None) -> Any:
    """A CuPy view of ``t`` (None stays None); bfloat16 as uint16 bits. Detached first: DLPack refuses a tensor
    that requires grad, and a Function's forward receives its inputs as they are."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return from_dlpack(t.view(torch.int16)).view(np.uint16)  # CuPy takes NumPy dtypes
    return from_dlpack(t)


@contextmanager
def on_stream(t: torch.Tensor) -> Iterator[None]:
    """CuPy on ``t``'s device and torch's current stream there."""
    cp = _cupy()
    stream = torch.cuda.current_stream(t.device)
    with cp.cuda.Device(t.device.index), cp.cuda.ExternalStream(stream.cuda_stream, t.device.index):
        yield


class CupyKernels:
    """:class:`peftdecl_torch.cuda_functions.Kernels` through the wrappers in :mod:`peftdecl_cupy`."""

    dtypes = frozenset({torch.float32, torch.bfloat16})
    param_dtypes = frozenset({torch.float32})
    max_block = rotation_kernels.MAX_BLOCK
    max_rank = delta_kernels.MAX_RANK
    max_gather_rank = planning.GATHER_MAX_RANK
    low = CupyLowRank()
    dora = CupyDora(low)

    def rotate(self, x: torch.Tensor, r: torch.Tensor, transpose: bool) -> torch.Tensor:
        out = torch.empty_like(x)
        with on_stream(x):
            rotation_kernels.rotate_blocks(view(x), view(r), transpose, out=view(out))
        return out

    def rotate_tn(self, x: torch.Tensor, g: torch.Tensor, b: int) -> torch.Tensor:
        out = torch.zeros(x.shape[1] // b, b, b, dtype=torch.float32, device=x.device)
        with on_stream(x):
            rotation_kernels.block_tn(view(x), view(g), b, out=view(out))
        return out

    def butterfly_factor(
        self, x: torch.Tensor, q: torch.Tensor, idx: torch.Tensor | None, transpose: bool
    ) -> torch.Tensor:
        out = torch.empty_like(x)
        with on_stream(x):
            rotation_kernels.butterfly_factor(view(x), view(q), view(idx), transpose, out=view(out))
        return out

    def butterfly_factor_tn(
        self, x: torch.Tensor, g: torch.Tensor, idx: torch.Tensor | None, b: int
    ) -> torch.Tensor:
        out = torch.zeros(x.shape[1] // b, b, b, dtype=torch.float32, device=x.device)
        with on_stream(x):
            rotation_kernels.butterfly_factor_tn(view(x), view(g), view(idx), b, out=view(out))
        return out

    def skew_solve(self, s: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rhs)
        with on_stream(s):
            rotation_kernels.skew_solve(view(s), view(rhs), 1.0, out=view(out))
        return out

    def neumann(self, q: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
        out = torch.empty_like(q)
        with on_stream(q):
            rotation_kernels.neumann(view(q), coefficients, out=view(out))
        return out

    def scale_columns(self, y: torch.Tensor, scale: torch.Tensor, in_place: bool) -> torch.Tensor:
        out = y if in_place else torch.empty_like(y)
        with on_stream(y):
            scaling_kernels.scale_columns(view(y), view(scale), out=view(out))
        return out

    def scale_columns_backward(
        self, dy: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dy_scaled = torch.empty_like(dy)
        dl = torch.zeros(dy.shape[1], dtype=torch.float32, device=dy.device)
        with on_stream(dy):
            scaling_kernels.scale_columns_backward(view(dy), view(y), view(scale), view(dy_scaled), view(dl))
        return dy_scaled, dl

    def lowrank_add(
        self,
        out: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor,
        sm: torch.Tensor | None,
        sn: torch.Tensor | None,
        sk: torch.Tensor | None,
    ) -> torch.Tensor:
        with on_stream(out):
            o = view(out)
            scaling_kernels.lowrank_add(o, view(p), view(q), sm=view(sm), sn=view(sn), sk=view(sk), out=o)
        return out

    def loha_delta(
        self, a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, scale: float
    ) -> torch.Tensor:
        out = torch.empty(a1.shape[0], b1.shape[1], dtype=a1.dtype, device=a1.device)
        with on_stream(a1):
            delta_kernels.loha_delta(view(a1), view(b1), view(a2), view(b2), scale, out=view(out))
        return out

    def loha_backward(
        self,
        g: torch.Tensor,
        a1: torch.Tensor,
        b1: torch.Tensor,
        a2: torch.Tensor,
        b2: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dp1, dp2 = torch.empty_like(g), torch.empty_like(g)
        with on_stream(g):
            delta_kernels.loha_backward(
                view(g), view(a1), view(b1), view(a2), view(b2), scale, dp1=view(dp1), dp2=view(dp2)
            )
        return dp1, dp2

    def kron_delta(self, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
        shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
        out = torch.empty(shape, dtype=w1.dtype, device=w1.device)
        with on_stream(w1):
            delta_kernels.kron_delta(view(w1), view(w2), scale, out=view(out))
        return out

    def kron_backward(
        self, g: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        with on_stream(g):
            delta_kernels.kron_backward(view(g), view(w1), view(w2), scale, dw1=view(dw1), dw2=view(dw2))
        return dw1, dw2

    def nf4_dequant(
        self,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        table: torch.Tensor,
        blocksize: int,
        out: torch.Tensor,
    ) -> torch.Tensor:
        with on_stream(out):
            nf4_kernels.nf4_dequant(view(codes), view(absmax), view(table), blocksize, view(out))
        return out

    def nf4_lowrank(
        self,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        table: torch.Tensor,
        blocksize: int,
        b: torch.Tensor,
        a: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> torch.Tensor:
        with on_stream(out):
            nf4_kernels.nf4_lowrank(
                view(codes), view(absmax), view(table), blocksize, view(b), view(a), scale, view(out)
            )
        return out

    def absmax_dequant(
        self, q: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, offset: float, blocksize: int
    ) -> torch.Tensor:
        out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
        with on_stream(q):
            nf4_kernels.absmax_dequant(view(q), view(code), view(absmax), offset, blocksize, out=view(out))
        return out

    def mixed(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
        index: np.ndarray,
    ) -> torch.Tensor:
        with on_stream(y):
            factors = [(view(a), view(b), s) for a, b, s in adapters]
            CupyMixed().run(view(x), view(y), factors, index)
        return y

    def shrink(
        self, x: torch.Tensor, a: torch.Tensor, alpha: float, rank_scale: torch.Tensor | None
    ) -> torch.Tensor:
        u = torch.empty(x.shape[0], a.shape[0], dtype=_accumulation(x.dtype), device=x.device)
        with on_stream(x):
            self.low.shrink(view(x), view(a), alpha, view(rank_scale), out=view(u))
        return u

    def expand(self, u: torch.Tensor, b: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        with on_stream(y):
            self.low.expand(view(u), view(b), view(y), alpha)
        return y

    def outer(self, u: torch.Tensor, x: torch.Tensor, out: torch.Tensor, alpha: float) -> torch.Tensor:
        workspace = torch.zeros(u.shape[1], x.shape[1], dtype=_accumulation(x.dtype), device=x.device)
        with on_stream(x):
            self.low.outer(view(u), view(x), view(out), alpha, workspace=view(workspace))
        return out

    def dora_norm(self, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        out = torch.empty(weight.shape[0], dtype=_accumulation(weight.dtype), device=weight.device)
        with on_stream(weight):
            self.dora.norm(view(weight), view(a), view(b), s, out=view(out))
        return out

    def dora_output(
        self,
        u: torch.Tensor,
        b: torch.Tensor,
        y: torch.Tensor,
        bias: torch.Tensor | None,
        m: torch.Tensor,
        n: torch.Tensor,
        s: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, direction = torch.empty_like(y), torch.empty_like(y)
        with on_stream(y):
            self.dora.output(
                view(u),
                view(b),
                view(y),
                view(bias),
                view(m),
                view(n),
                s,
                out=view(out),
                direction=view(direction),
            )
        return out, direction


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
