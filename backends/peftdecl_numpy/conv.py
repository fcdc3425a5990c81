"""N-d convolution (1-, 2- and 3-d) with its input and weight gradients, by shifted-window sums, on any array
namespace.

Shapes follow torch: x [N, C, *spatial], w [O, C/groups, *kernel], y [N, O, *out_spatial].
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from peftdecl_numpy.xp_ops import Array, einsum, kernel_at, namespace, pad_spatial, spatial


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


def conv_forward(
    x: Array,
    w: Array,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int = 1,
) -> Array:
    """y[n, o, p] = Σ_{c, k} w[o, c, k] · x_pad[n, c, p·stride + k·dilation] within each group."""
    xp = namespace(x, w)
    n = x.shape[0]
    o, cg = w.shape[:2]
    padded = pad_spatial(x, padding)
    out, windows = _windows(padded.shape[2:], w.shape[2:], stride, dilation)
    wg = xp.reshape(w, (groups, o // groups, cg, *w.shape[2:]))
    y = xp.zeros((n, groups, o // groups, *out), dtype=xp.result_type(x, w))
    for offset, slices in windows:
        patch = xp.reshape(padded[spatial(slices)], (n, groups, cg, *out))
        y += einsum("ngc...,goc->ngo...", patch, wg[kernel_at(offset)])
    return xp.reshape(y, (n, o, *out))


def conv_backward(
    x: Array,
    w: Array,
    dy: Array,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int = 1,
    need_input: bool = True,
) -> tuple[Array | None, Array]:
    """Gradients (dL/dx, dL/dw) of :func:`conv_forward` given dL/dy."""
    xp = namespace(x, w, dy)
    n = x.shape[0]
    o, cg = w.shape[:2]
    padded = pad_spatial(x, padding)
    out, windows = _windows(padded.shape[2:], w.shape[2:], stride, dilation)
    wg = xp.reshape(w, (groups, o // groups, cg, *w.shape[2:]))
    dyg = xp.reshape(dy, (n, groups, o // groups, *out))
    dyg_flat = xp.reshape(dyg, (*dyg.shape[:3], -1))
    dw = xp.zeros_like(wg)
    dxp = xp.zeros_like(padded) if need_input else None
    for offset, slices in windows:
        index = (slice(None), slice(None), *slices)
        patch = xp.reshape(padded[index], (n, groups, cg, -1))
        dw[kernel_at(offset)] = einsum("ngop,ngcp->goc", dyg_flat, patch)
        if dxp is not None:
            dxp[index] += xp.reshape(
                einsum("ngo...,goc->ngc...", dyg, wg[kernel_at(offset)]), (n, groups * cg, *out)
            )
    dx = None
    if dxp is not None:
        crop = tuple(slice(p, p + size) for p, size in zip(padding, x.shape[2:], strict=True))
        dx = dxp[spatial(crop)]
    return dx, xp.reshape(dw, w.shape)
