"""A torch double of the CUDA kernels (:class:`TorchKernels`): what each kernel's source states, computed with torch
ops and the kernels' own index conventions (the BOFT factor's folded permutation, bitsandbytes' nibble order), on
any device and in float64 too. The dispatch tests route the torch backend's hooks to it on the CPU.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch


class TorchKernels:
    """The kernels' contracts (``backends/peftdecl_cupy/kernels/*.cu``) in torch ops; counts every call."""

    dtypes = frozenset({torch.float32, torch.float64})
    param_dtypes = frozenset({torch.float32, torch.float64})
    max_block = 64
    max_rank = 256
    max_gather_rank = 256

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def rotate(self, x: Any, r: Any, transpose: bool) -> Any:
        self.calls["rotate"] += 1
        n, b, _ = r.shape
        rr = r.transpose(1, 2) if transpose else r
        return torch.einsum("tnk,nkc->tnc", x.view(-1, n, b), rr).reshape(x.shape)

    def rotate_tn(self, x: Any, g: Any, b: int) -> Any:
        self.calls["rotate_tn"] += 1
        n = x.shape[1] // b
        return torch.einsum("tnk,tnc->nkc", x.view(-1, n, b), g.view(-1, n, b))

    def butterfly_factor(self, x: Any, q: Any, idx: Any, transpose: bool) -> Any:
        """y[:, idx[j]] = Σ_k x[:, idx[i·b + k]] Q[i, k, c] (j = i·b + c): gather, rotate, scatter by one table."""
        self.calls["butterfly_factor"] += 1
        n, b, _ = q.shape
        gathered = x if idx is None else x[:, idx.long()]
        qq = q.transpose(1, 2) if transpose else q
        z = torch.einsum("tnk,nkc->tnc", gathered.reshape(-1, n, b), qq).reshape(x.shape)
        if idx is None:
            return z
        y = torch.empty_like(z)
        y[:, idx.long()] = z
        return y

    def butterfly_factor_tn(self, x: Any, g: Any, idx: Any, b: int) -> Any:
        self.calls["butterfly_factor_tn"] += 1
        if idx is not None:
            x, g = x[:, idx.long()], g[:, idx.long()]
        n = x.shape[1] // b
        return torch.einsum("tnk,tnc->nkc", x.reshape(-1, n, b), g.reshape(-1, n, b))

    def skew_solve(self, s: Any, rhs: Any) -> Any:
        self.calls["skew_solve"] += 1
        return torch.linalg.solve(torch.eye(s.shape[-1], dtype=s.dtype) + s, rhs)

    def neumann(self, q: Any, coefficients: Sequence[float]) -> Any:
        self.calls["neumann"] += 1
        power = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
        out = coefficients[0] * power
        for c in coefficients[1:]:
            power = power @ q
            out = out + c * power
        return out

    def scale_columns(self, y: Any, scale: Any, in_place: bool) -> Any:
        self.calls["scale_columns"] += 1
        return y.mul_(scale) if in_place else (y * scale).to(y.dtype)

    def scale_columns_backward(self, dy: Any, y: Any, scale: Any) -> tuple[Any, Any]:
        self.calls["scale_columns_backward"] += 1
        return (dy * scale).to(dy.dtype), (dy * y).sum(0).to(scale.dtype)

    def lowrank_add(self, out: Any, p: Any, q: Any, sm: Any, sn: Any, sk: Any) -> Any:
        """out += diag(sm) (P diag(sk) Q) diag(sn), None scales being 1."""
        self.calls["lowrank_add"] += 1
        product = (p if sk is None else p * sk) @ q
        product = product if sm is None else product * sm[:, None]
        return out.add_((product if sn is None else product * sn).to(out.dtype))

    def loha_delta(self, a1: Any, b1: Any, a2: Any, b2: Any, scale: float) -> Any:
        self.calls["loha_delta"] += 1
        return scale * (a1 @ b1) * (a2 @ b2)

    def loha_backward(self, g: Any, a1: Any, b1: Any, a2: Any, b2: Any, scale: float) -> tuple[Any, Any]:
        self.calls["loha_backward"] += 1
        return scale * g * (a2 @ b2), scale * g * (a1 @ b1)

    def kron_delta(self, w1: Any, w2: Any, scale: float) -> Any:
        self.calls["kron_delta"] += 1
        return scale * torch.kron(w1, w2)

    def kron_backward(self, g: Any, w1: Any, w2: Any, scale: float) -> tuple[Any, Any]:
        self.calls["kron_backward"] += 1
        (m1, n1), (p, q) = w1.shape, w2.shape
        blocks = g.reshape(m1, p, n1, q)
        return scale * torch.einsum("ipkq,pq->ik", blocks, w2), scale * torch.einsum(
            "ipkq,ik->pq", blocks, w1
        )

    def nf4_dequant(self, codes: Any, absmax: Any, table: Any, blocksize: int, out: Any) -> Any:
        """Element e: nibble codes[e // 2] >> 4 (even e) or & 15 (odd e), times absmax[e // blocksize]."""
        self.calls["nf4_dequant"] += 1
        e = torch.arange(out.numel())
        byte = codes[e // 2].long()
        nibble = torch.where(e % 2 == 0, byte >> 4, byte & 15)
        return out.copy_((table[nibble] * absmax[e // blocksize]).reshape(out.shape))

    def nf4_lowrank(
        self, codes: Any, absmax: Any, table: Any, blocksize: int, b: Any, a: Any, scale: float, out: Any
    ) -> Any:
        """out = dequant(W) + s · b a."""
        self.calls["nf4_lowrank"] += 1
        counted = self.calls["nf4_dequant"]
        self.nf4_dequant(codes, absmax, table, blocksize, out)
        self.calls["nf4_dequant"] = counted
        return out.add_(scale * (b @ a))

    def absmax_dequant(self, q: Any, code: Any, absmax: Any, offset: float, blocksize: int) -> Any:
        self.calls["absmax_dequant"] += 1
        i = torch.arange(q.shape[0])
        return code[q.long()] * absmax[i // blocksize] + offset

    def mixed(self, x: Any, y: Any, adapters: Any, index: Any) -> Any:
        """Y[t] += s_i (X[t] A_iᵀ) B_iᵀ in place for i = index[t] >= 0, summed in the accumulation type."""
        self.calls["mixed"] += 1
        assert x.is_contiguous() and y.is_contiguous() and index.shape == (x.shape[0],) == (y.shape[0],)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = y.to(acc)
        for i, (a, b, s) in enumerate(adapters):
            assert a.dtype == b.dtype == x.dtype and a.shape[0] == b.shape[1]
            rows = torch.from_numpy(index == i).nonzero().flatten()
            out[rows] += s * ((x[rows].to(acc) @ a.to(acc).t()) @ b.to(acc).t())
        return y.copy_(out.to(y.dtype))

    # the low-rank kernels (lora.cu, dora.cu): U and the norms in the accumulation type
    @staticmethod
    def _acc(dtype: Any) -> Any:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def shrink(self, x: Any, a: Any, alpha: float, rank_scale: Any) -> Any:
        """U = α (X Aᵀ) ⊙ e."""
        self.calls["shrink"] += 1
        acc = self._acc(x.dtype)
        u = alpha * (x.to(acc) @ a.to(acc).t())
        return u if rank_scale is None else u * rank_scale.to(acc)

    def expand(self, u: Any, b: Any, y: Any, alpha: float) -> Any:
        """Y += α U Bᵀ in place."""
        self.calls["expand"] += 1
        assert y.is_contiguous()
        acc = u.dtype
        return y.copy_((y.to(acc) + alpha * (u @ b.to(acc).t())).to(y.dtype))

    def outer(self, u: Any, x: Any, out: Any, alpha: float) -> Any:
        """G = α Uᵀ X written into ``out`` (any strides)."""
        self.calls["outer"] += 1
        return out.copy_((alpha * (u.t() @ x.to(u.dtype))).to(out.dtype))

    def dora_norm(self, weight: Any, a: Any, b: Any, s: float) -> Any:
        """n = sqrt(max(0, ‖W‖² + 2s ⟨B, W Aᵀ⟩ + s² ⟨B, B A Aᵀ⟩)) per row."""
        self.calls["dora_norm"] += 1
        acc = self._acc(weight.dtype)
        w, a, b = weight.to(acc), a.to(acc), b.to(acc)
        squared = (w * w).sum(1) + 2 * s * (b * (w @ a.t())).sum(1) + s * s * (b * (b @ (a @ a.t()))).sum(1)
        return squared.clamp_min(0).sqrt()

    def dora_output(self, u: Any, b: Any, y: Any, bias: Any, m: Any, n: Any, s: float) -> tuple[Any, Any]:
        """(b + g ⊙ D, D) with D = Y − b + s U Bᵀ, g = m / n (1 where n = 0)."""
        self.calls["dora_output"] += 1
        acc = u.dtype
        base = 0 if bias is None else bias.to(acc)
        direction = y.to(acc) - base + s * (u @ b.to(acc).t())
        g = torch.where(n > 0, m.to(acc) / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
        return (base + g * direction).to(y.dtype), direction.to(y.dtype)


@contextmanager
def routed_to_double(monkeypatch: pytest.MonkeyPatch) -> Iterator[TorchKernels]:
    """The torch backend's hooks routed to a fresh :class:`TorchKernels`, CPU tensors counted as the kernels'
    device, the switch on; the cached decisions are forgotten on the way out."""
    from peftdecl_torch import cuda_kernels

    monkeypatch.setenv(cuda_kernels.ENV, "1")
    monkeypatch.setattr(cuda_kernels, "DEVICE_TYPE", "cpu")
    cuda_kernels.refresh()
    kernels = TorchKernels()
    with cuda_kernels.use_kernels(kernels):
        yield kernels
    cuda_kernels.refresh()


def numpy_from_dlpack(t: Any) -> Any:
    """What ``cupy.from_dlpack`` gives on a device: the tensor's memory; like torch's ``__dlpack__`` (even inside
    a Function's forward, where ``Tensor.numpy`` would allow it) it refuses a tensor that requires grad."""
    if t.requires_grad:
        raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")
    return t.numpy()
