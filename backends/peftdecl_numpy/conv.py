"""N-d convolution (1-d and 2-d) in float64 with its input and weight gradients, by shifted-window sums.

Shapes follow torch: x [N, C, *spatial], w [O, C/groups, *kernel], y [N, O, *out_spatial].
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def _windows(
    spatial: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[slice, ...]]]]:
    out = tuple(
        (n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(spatial, kernel, stride, dilation, strict=True)
    )
    windows = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        slices = tuple(
            slice(o * d, o * d + s * (m - 1) + 1, s)
            for o, d, s, m in zip(offset, dilation, stride, out, strict=True)
        )
        windows.append((offset, slices))
    return out, windows


def _pad(x: np.ndarray, padding: Sequence[int]) -> np.ndarray:
    return np.pad(x, [(0, 0), (0, 0), *((p, p) for p in padding)])


def conv_forward(
    x: np.ndarray,
    w: np.ndarray,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int = 1,
) -> np.ndarray:
    """y[n, o, p] = Σ_{c, k} w[o, c, k] · x_pad[n, c, p·stride + k·dilation] within each group."""
    n = x.shape[0]
    o, cg = w.shape[:2]
    xp = _pad(x, padding)
    out, windows = _windows(xp.shape[2:], w.shape[2:], stride, dilation)
    wg = w.reshape(groups, o // groups, cg, *w.shape[2:])
    y = np.zeros((n, groups, o // groups, *out), dtype=np.result_type(x, w))
    for offset, slices in windows:
        patch = xp[(slice(None), slice(None), *slices)].reshape(n, groups, cg, *out)
        y += np.einsum("ngc...,goc->ngo...", patch, wg[(..., *offset)])
    return y.reshape(n, o, *out)


def conv_backward(
    x: np.ndarray,
    w: np.ndarray,
    dy: np.ndarray,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int = 1,
    need_input: bool = True,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Gradients (dL/dx, dL/dw) of :func:`conv_forward` given dL/dy."""
    n = x.shape[0]
    o, cg = w.shape[:2]
    xp = _pad(x, padding)
    out, windows = _windows(xp.shape[2:], w.shape[2:], stride, dilation)
    wg = w.reshape(groups, o // groups, cg, *w.shape[2:])
    dyg = dy.reshape(n, groups, o // groups, *out)
    dw = np.zeros_like(wg)
    dxp = np.zeros_like(xp) if need_input else None
    for offset, slices in windows:
        index = (slice(None), slice(None), *slices)
        patch = xp[index].reshape(n, groups, cg, *out)
        dw[(..., *offset)] = np.einsum(
            "ngop,ngcp->goc", dyg.reshape(*dyg.shape[:3], -1), patch.reshape(*patch.shape[:3], -1)
        )
        if dxp is not None:
            dxp[index] += np.einsum("ngo...,goc->ngc...", dyg, wg[(..., *offset)]).reshape(
                n, groups * cg, *out
            )
    dx = None
    if dxp is not None:
        crop = tuple(slice(p, p + size) for p, size in zip(padding, x.shape[2:], strict=True))
        dx = dxp[(slice(None), slice(None), *crop)]
    return dx, dw.reshape(w.shape)
