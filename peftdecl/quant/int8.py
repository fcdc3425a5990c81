"""bitsandbytes' LLM.int8 row-wise weight codec in NumPy, bit-identical to
``bitsandbytes.functional.int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` on the CPU.

Math: for row r, ``SCB_r = max_j |w_rj|`` and ``code_rj = round_half_even(w_rj · (127 / SCB_r))`` (int8), so
``w_rj ≈ code_rj · SCB_r / 127``. With ``threshold`` t > 0, entries with ``|w| >= t`` are outliers: they are left
out of ``SCB``, and (when there is more than one row) every column holding one is coded 0; those columns are
listed in ``extras["outlier_cols"]`` and kept in 16 bits at run time by the layer.

Float32 rounding follows bitsandbytes: ``127 / SCB_r`` is torch's ``127 · (1 / SCB_r)`` (two float32 roundings),
the product one float32 multiply;
dequantising is ``(code · SCB_r) · float32(1/127)`` (bitsandbytes' constant 7.874015718698502e-3). A row of
zeros (SCB 0) and a row whose SCB is so small that 127/SCB overflows give non-finite products; bitsandbytes'
float-to-int8 cast turns those into 0 on x86-64, and so does this codec.
"""

from __future__ import annotations

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.quant.scheme import Quantized, QuantScheme

F32 = np.float32
#: bitsandbytes' float32 reciprocal of 127 used when dequantising.
INV_127 = F32(7.874015718698502e-3)


def _check_weight(w: np.ndarray) -> np.ndarray:
    if w.ndim != 2:
        raise PeftdeclError(
            f"quantize_int8: weight must be 2-D (out_features, in_features), got shape {w.shape}"
        )
    if w.size == 0:
        raise PeftdeclError(f"quantize_int8: weight of shape {w.shape} is empty")
    if w.dtype not in (np.float16, np.float32) and w.dtype.name != "bfloat16":
        raise PeftdeclError(f"quantize_int8: weight dtype {w.dtype} is not float16/bfloat16/float32")
    values = np.asarray(w).astype(F32)
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        row, col = (int(i) for i in bad[0])
        raise PeftdeclError(
            f"quantize_int8: weight of shape {w.shape} holds {len(bad)} non-finite value(s) (inf/NaN), "
            f"first {values[row, col]} at index ({row}, {col})"
        )
    return values


def quantize_int8(w: np.ndarray, scheme: QuantScheme) -> Quantized:
    """Row-wise absmax int8 codes of a 2-D weight: ``codes`` int8 of ``w``'s shape, ``scales`` the float32 SCB per
    row, ``extras["outlier_cols"]`` (int64, empty unless ``scheme.threshold`` > 0 finds outliers)."""
    if scheme.kind != "int8":
        raise PeftdeclError(f"quantize_int8: scheme kind {scheme.kind!r} is not 'int8'")
    values = _check_weight(w)
    magnitude = np.abs(values)
    outlier_cols = np.zeros(0, dtype=np.int64)
    if scheme.threshold > 0.0:
        outliers = magnitude >= F32(scheme.threshold)
        outlier_cols = np.flatnonzero(outliers.any(axis=0)).astype(np.int64)
        values = np.where(outliers, F32(0.0), values)
        magnitude = np.abs(values)
    scb = magnitude.max(axis=1).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        factor = ((F32(1.0) / scb).astype(F32) * F32(127.0)).astype(F32)  # torch's `127.0 / t` is 127·(1/t)
        scaled = (values * factor[:, None]).astype(F32)
    codes = np.where(np.isfinite(scaled), np.rint(scaled), F32(0.0)).astype(np.int8)
    if values.shape[0] > 1 and outlier_cols.size:
        codes[:, outlier_cols] = 0
    return Quantized(
        scheme=scheme, codes=codes, scales=scb, shape=tuple(w.shape), extras={"outlier_cols": outlier_cols}
    )


def dequantize_int8(q: Quantized) -> np.ndarray:
    """Float32 weights ``(code · SCB_r) · (1/127)``; outlier columns come back as 0 (their values are not stored)."""
    if q.scheme.kind != "int8":
        raise PeftdeclError(f"dequantize_int8: scheme kind {q.scheme.kind!r} is not 'int8'")
    with np.errstate(
        over="ignore"
    ):  # code · SCB may pass float32's range for SCB near it, as in bitsandbytes
        product = (q.codes.astype(F32) * np.asarray(q.scales, dtype=F32)[:, None]).astype(F32)
        weights: np.ndarray = (product * INV_127).astype(F32)
    return weights
