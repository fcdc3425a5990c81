"""bitsandbytes' 4-bit codecs (NF4, FP4) in NumPy, bit-identical to ``bitsandbytes.functional.quantize_4bit`` /
``dequantize_4bit`` on the CPU.

Math: the flattened weight is cut into blocks of ``block_size``; ``absmax_b = max |w|`` over block b, and
``w ≈ absmax_b · T[code]`` with ``code`` the entry of the 16-value table T nearest to ``w / absmax_b`` (ties go to
the lower table value). Two codes share a byte, the first in the high nibble. With double quantisation the absmax
values are stored as ``absmax_b ≈ offset + nested_absmax_k · D[c_b]``: ``offset`` is their float32 mean, D the
256-value signed dynamic map, one ``nested_absmax_k`` per ``nested_block_size`` absmax values.

Float32 rounding follows bitsandbytes step by step: full blocks are scaled by the float32 reciprocal of their
absmax (clamped below at 1e-38), a last partial block is divided by its clamped absmax (and stores the clamped
value), the offset is torch's float32 ``mean`` (see :func:`torch_float32_sum`; above 32768 absmax values torch splits
that sum over threads, so bitsandbytes' own offset then depends on its thread count), and the nested codes come
from bitsandbytes' CPU 65536-entry lookup table (:func:`quantize_blockwise_8bit`), not an exact nearest search.
Edge cases follow from the same arithmetic: a block of zeros stores absmax 0 (a last partial block stores 1e-38)
and codes 0 as T's zero; a block whose absmax is subnormal has an infinite reciprocal, so its zeros become NaN and
take T's last code. Non-finite weights are refused (bitsandbytes would code them silently).
"""

from __future__ import annotations

import functools

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.quant.scheme import Quantized, QuantScheme

F32 = np.float32
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1] (QLoRA, Dettmers et al. 2023), in code order.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=F32,
)

#: FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2): the value of each 3-bit magnitude pattern, then negated for
#: the sign bit, divided by the largest (12) so the table spans [-1, 1]. Adding +0.0 turns the negated zero into
#: +0.0, as bitsandbytes stores it (equal values; the saved ``quant_map`` bytes must match).
_FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4_CODE = (
    np.array(_FP4_MAGNITUDES + [-m for m in _FP4_MAGNITUDES], dtype=F32) / F32(12.0) + F32(0.0)
).astype(F32)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 on the CPU: ``start + step·i`` below the halfway index, ``end - step·(steps-1-i)``
    from it on, each a fused multiply-add (one rounding; exact in float64 for these small ``i``)."""
    first, last = F32(start), F32(end)
    step = np.float64(F32((last - first) / F32(steps - 1)))
    index = np.arange(steps, dtype=np.float64)
    up = np.float64(first) + step * index
    down = np.float64(last) - step * (steps - 1 - index)
    points: np.ndarray = np.where(index < steps // 2, up, down).astype(F32)
    return points


def dynamic_map() -> np.ndarray:
    """The 256-value signed dynamic map (7 exponent bits) that double quantisation codes absmax values with.

    Decade ``i`` (0..6) holds the midpoints of ``2**i + 1`` evenly spaced points on [0.1, 1], times ``10**(i-6)``,
    with both signs; then 0 and 1; sorted."""
    values: list[float] = []
    for decade in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2**decade + 1)
        means = ((bounds[:-1] + bounds[1:]) / F32(2.0)).astype(F32)
        scale = F32(10.0 ** (decade - 6))  # bitsandbytes scales the float32 means in float32
        values += [float(v) for v in (scale * means).astype(F32)]
        values += [float(v) for v in (-scale * means).astype(F32)]
    values += [0.0, 1.0]
    return np.array(sorted(values), dtype=F32)


def _ceil_log2(value: int) -> int:
    return 0 if value <= 1 else (value - 1).bit_length()


def _cascade_rows(rows: np.ndarray) -> np.ndarray:
    """Sum ``rows`` (float32) along axis 0 the way torch's 4-level cascade does: groups of ``2**level_power``
    rows are summed in order into level 0, which is carried up a level after every group."""
    size, levels = rows.shape[0], 4
    level_power = max(4, _ceil_log2(size) // levels)
    step = 1 << level_power
    acc = np.zeros((levels, *rows.shape[1:]), dtype=F32)
    done = 0
    while done + step <= size:
        acc[0] = np.add.reduce(rows[done : done + step], axis=0, dtype=F32)
        done += step
        for level in range(1, levels):
            acc[level] += acc[level - 1]
            acc[level - 1] = 0
            if done & ((step - 1) << (level * level_power)):
                break
    for row in rows[done:]:
        acc[0] += row
    for level in range(1, levels):
        acc[0] += acc[level]
    total: np.ndarray = acc[0]
    return total


def _ilp_sum(items: np.ndarray) -> np.ndarray:
    """Sum along axis 0 with four interleaved accumulators (element i goes to i % 4), leftovers into the first."""
    count = items.shape[0] // 4
    partial = _cascade_rows(items[: count * 4].reshape(count, 4, *items.shape[1:]))
    total: np.ndarray = partial[0].copy()
    for item in items[count * 4 :]:
        total += item
    for k in range(1, 4):
        total += partial[k]
    return total


def _single_thread_sum(flat: np.ndarray, lanes: int) -> np.float32:
    n_vectors = flat.size // lanes
    if n_vectors == 0:
        only: np.float32 = F32(_ilp_sum(flat)[()])
        return only
    lane_sums = _ilp_sum(flat[: n_vectors * lanes].reshape(n_vectors, lanes))
    total: np.float32 = F32(0.0)
    for value in flat[n_vectors * lanes :]:
        total = F32(total + value)
    for value in lane_sums:
        total = F32(total + value)
    return total


TORCH_GRAIN_SIZE = 32768


def torch_float32_sum(values: np.ndarray, threads: int = 1, lanes: int = 8) -> np.float32:
    """torch's CPU ``sum`` of a contiguous float32 vector, rounding for rounding. One thread: ``lanes``-wide
    vectors summed by :func:`_ilp_sum`, then the scalar tail, then the lanes in order. Above 32768 values torch
    gives each of ``min(threads, ceil(n / 32768))`` threads an equal contiguous chunk and adds the chunk sums in
    order, so the result depends on torch's intra-op thread count."""
    flat = np.ascontiguousarray(values, dtype=F32).reshape(-1)
    workers = min(max(threads, 1), -(-flat.size // TORCH_GRAIN_SIZE))
    if workers <= 1:
        return _single_thread_sum(flat, lanes)
    chunk = -(-flat.size // workers)
    total: np.float32 = F32(0.0)
    for start in range(0, flat.size, chunk):
        total = F32(total + _single_thread_sum(flat[start : start + chunk], lanes))
    return total


def _check_weight(w: np.ndarray) -> np.ndarray:
    if w.dtype not in (np.float16, np.float32, np.float64) and w.dtype.name != "bfloat16":
        raise PeftdeclError(f"quantise: weight dtype {w.dtype} is not float16/bfloat16/float32/float64")
    if w.size == 0:
        raise PeftdeclError(f"quantise: weight of shape {w.shape} is empty")
    flat = np.asarray(w).reshape(-1).astype(F32)
    bad = np.flatnonzero(~np.isfinite(flat))
    if bad.size:
        index = np.unravel_index(int(bad[0]), w.shape)
        raise PeftdeclError(
            f"quantise: weight of shape {w.shape} holds {bad.size} non-finite value(s) (inf/NaN), "
            f"first {flat[bad[0]]} at index {tuple(int(i) for i in index)}"
        )
    return flat


def _block_absmax_scaled(flat: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block absmax and the weights scaled into [-1, 1], rounded as bitsandbytes' CPU path rounds them."""
    n = flat.size
    full = n - n % block
    blocks = flat[:full].reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        reciprocal = (F32(1.0) / np.maximum(absmax, F32(1e-38))).astype(F32)
        scaled = np.clip(blocks * reciprocal[:, None], F32(-1), F32(1)).reshape(-1)
        if full < n:
            tail_absmax = max(F32(np.abs(flat[full:]).max()), F32(1e-38))
            absmax = np.append(absmax, F32(tail_absmax)).astype(F32)
            scaled = np.concatenate([scaled, np.clip(flat[full:] / F32(tail_absmax), F32(-1), F32(1))])
    return absmax.astype(F32), scaled.astype(F32)


def _table(kind: str) -> np.ndarray:
    return NF4_CODE if kind == "nf4" else FP4_CODE


def _check_scheme(scheme: QuantScheme) -> None:
    if scheme.kind not in ("nf4", "fp4"):
        raise PeftdeclError(f"quantize_4bit: scheme kind {scheme.kind!r} is not 'nf4' or 'fp4'")
    if scheme.block_size not in BLOCK_SIZES:
        raise PeftdeclError(f"quantize_4bit: block_size {scheme.block_size} is not one of {BLOCK_SIZES}")


LUT_SIZE = 65536


@functools.cache
def _nearest_code_table() -> np.ndarray:
    """bitsandbytes' CPU lookup table for the dynamic map: [-1, 1] cut into 65536 evenly spaced points
    ``-1 + 2i/65535``; point i takes the map entry nearest to it (the count of midpoints strictly below it)."""
    code = dynamic_map()
    midpoints = (F32(0.5) * (code[:-1] + code[1:]).astype(F32)).astype(F32)
    points = (F32(-1.0) + (F32(2.0) * np.arange(LUT_SIZE, dtype=F32)) / F32(LUT_SIZE - 1)).astype(F32)
    table: np.ndarray = np.searchsorted(midpoints, points, side="left").astype(np.uint8)
    return table


def quantize_blockwise_8bit(values: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' CPU ``quantize_blockwise`` with the dynamic map D: per-block absmax a; each value v becomes
    table entry ``trunc((clip(v · (1/a), -1, 1) + 1) · 0.5 · 65535 + 0.5)`` of :func:`_nearest_code_table` (so
    the code is D's nearest entry to v/a up to the table's 2/65535 resolution; 0 maps to D's entry 2.1e-5, not
    to D's 0). A block whose absmax is 0 gets code 0. Returns (uint8 codes, float32 absmax)."""
    flat = np.asarray(values, dtype=F32).reshape(-1)
    pad = (-flat.size) % block
    blocks = np.concatenate([flat, np.zeros(pad, F32)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        reciprocal = np.where(absmax == 0, F32(0.0), F32(1.0) / absmax).astype(F32)
    normed = np.clip((blocks * reciprocal[:, None]).astype(F32), F32(-1.0), F32(1.0))
    position = ((((normed + F32(1.0)) * F32(0.5)) * F32(LUT_SIZE - 1)).astype(F32) + F32(0.5)).astype(F32)
    codes = _nearest_code_table()[np.trunc(position).astype(np.int64)]
    codes = np.where(absmax[:, None] == 0, np.uint8(0), codes)
    return codes.reshape(-1)[: flat.size].astype(np.uint8), absmax


def quantize_4bit(w: np.ndarray, scheme: QuantScheme, *, torch_threads: int = 1) -> Quantized:
    """Quantise ``w`` to packed NF4/FP4 codes as bitsandbytes does (codes shape ``(ceil(n/2), 1)`` uint8).

    ``scales`` holds the float32 absmax per block, or with ``double_quant`` their uint8 codes; ``extras`` holds
    ``quant_map`` (the 16-value table) and, with ``double_quant``, ``offset`` (float32 scalar), ``nested_absmax``
    and ``nested_quant_map`` (the dynamic map). ``torch_threads``: torch's intra-op thread count in the
    bitsandbytes process to agree with; it only matters for the offset of more than 32768 absmax values."""
    _check_scheme(scheme)
    flat = _check_weight(w)
    absmax, scaled = _block_absmax_scaled(flat, scheme.block_size)
    table = _table(scheme.kind)
    # bitsandbytes searches T sorted; FP4's +0 (code 0) sorts before its -0 (code 8), so weights in
    # (-0.0026, 0] take code 0 and those in (0, 0.0026] take code 8; ties at a midpoint take the lower value
    order = np.argsort(table, kind="stable")
    sorted_table = table[order]
    midpoints = ((sorted_table[:-1] + sorted_table[1:]) / F32(2.0)).astype(F32)
    if scaled.size % 2:
        scaled = np.append(scaled, F32(0.0))
    codes = order[np.searchsorted(midpoints, scaled, side="left")].astype(np.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8).reshape(-1, 1)
    extras: dict[str, np.ndarray] = {"quant_map": table.copy()}
    scales = absmax
    if scheme.double_quant:
        with np.errstate(over="ignore"):
            offset = F32(torch_float32_sum(absmax, torch_threads) / F32(absmax.size))
        if not np.isfinite(offset):
            raise PeftdeclError(
                f"quantize_4bit: double quantisation of a weight of shape {w.shape} overflows float32: its "
                f"{absmax.size} block absmax values (largest {absmax.max():.3g}) sum to inf, so the mean offset "
                "is infinite (bitsandbytes stores it and dequantises to non-finite values); quantise without "
                "double_quant"
            )
        scales, nested_absmax = quantize_blockwise_8bit(
            (absmax - offset).astype(F32), scheme.nested_block_size
        )
        extras |= {
            "offset": np.array(offset, dtype=F32),
            "nested_absmax": nested_absmax,
            "nested_quant_map": dynamic_map(),
        }
    return Quantized(scheme=scheme, codes=packed, scales=scales, shape=tuple(w.shape), extras=extras)


def block_absmax(q: Quantized) -> np.ndarray:
    """The float32 absmax per block, undoing double quantisation: ``offset + nested_absmax_k · D[c_b]``."""
    if not q.scheme.double_quant:
        return np.asarray(q.scales, dtype=F32)
    nested = q.scheme.nested_block_size
    values = q.extras["nested_quant_map"][q.scales.astype(np.int64)]
    pad = (-values.size) % nested
    padded = np.concatenate([values, np.zeros(pad, F32)]).reshape(-1, nested)
    scaled = (padded * q.extras["nested_absmax"][:, None]).astype(F32).reshape(-1)[: values.size]
    absmax: np.ndarray = (scaled + F32(q.extras["offset"])).astype(F32)
    return absmax


def dequantize_4bit(q: Quantized) -> np.ndarray:
    """Float32 weights ``absmax_b · T[code]`` in the original shape, bit-identical to bitsandbytes (which returns
    the input dtype: this result rounded once to it). On AVX-512 CPUs bitsandbytes 0.50.2's own CPU kernel reads
    absmax per row when the last dimension is a multiple of 16 but not of the block size, so it disagrees with its
    own ``quantize_4bit`` there; this follows the layout ``quantize_4bit`` writes (its pure-torch kernel)."""
    _check_scheme(q.scheme)
    packed = q.codes.reshape(-1)
    codes = np.empty(packed.size * 2, dtype=np.int64)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    n = int(np.prod(q.shape))
    values = q.extras.get("quant_map", _table(q.scheme.kind))[codes[:n]]
    absmax = block_absmax(q)
    block = q.scheme.block_size
    pad = (-n) % block
    padded = np.concatenate([values, np.zeros(pad, F32)]).reshape(-1, block)
    weights: np.ndarray = (padded * absmax[:, None]).astype(F32).reshape(-1)[:n].reshape(q.shape)
    return weights
