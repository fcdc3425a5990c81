"""MLX's affine quantisation (``mx.quantize``/``mx.dequantize``, mode ``"affine"``) in NumPy, bit for bit.

Each run of ``group_size`` weights along the last axis shares a scale s and a bias β: w ≈ s · q + β, with the
code q = clip(rint((w − β) / s), 0, 2ᵇⁱᵗˢ − 1) (rint: half to even; all in float32, as MLX computes it).

How MLX picks s and β (read off its CPU kernel, confirmed by the tests against mlx 0.32): s₀ = max((max − min) /
(2ᵇⁱᵗˢ − 1), 1e-7). From 2 bits up, the group's edge of larger magnitude (the min when |min| > |max|, else the
max) is stored exactly: β = edge and s = edge / rint(edge / ±s₀), the sign (− when the edge is the max) keeping
the codes non-negative; when rint(edge / ±s₀) is 0 (an all-zero group), β = 0 and s = ±s₀. With 1 bit, s = s₀
and β = min. Scales and biases are then rounded to the input's dtype; the codes were computed with the unrounded
float32 values. A row's codes form one little-endian bit stream (code j in bits j·b … j·b + b − 1) stored as
uint32 words, so 3-, 5- and 6-bit codes straddle word boundaries. Dequantising computes s · q in float32, rounds
it to the dtype, adds β in float32 and rounds again, as MLX's half-precision arithmetic does.

bfloat16 has no NumPy dtype here: such weights travel as float32 arrays holding bfloat16 values (the scales and
biases likewise), and ``dtype="bfloat16"`` says so.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.quant.scheme import Quantized, QuantScheme

FloatName = Literal["float32", "float16", "bfloat16"]
_FLOAT_NAMES: tuple[FloatName, ...] = ("float32", "float16", "bfloat16")

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)  # mlx 0.32 also takes 1 bit; the QuantScheme docstring lists 2–8
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_MIN_SCALE = np.float32(1e-7)  # MLX's floor on a group's step, so a constant group gets a non-zero scale


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), returned as float32 (finite inputs)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _round_to(x: np.ndarray, dtype: FloatName) -> np.ndarray:
    """float32 values rounded to ``dtype`` (bfloat16 kept in float32), as MLX casts a float result."""
    x = np.asarray(x, np.float32)
    if dtype == "bfloat16":
        return round_to_bfloat16(x)
    return x.astype(np.float16) if dtype == "float16" else x


def _check_scheme(scheme: QuantScheme) -> tuple[int, int]:
    if scheme.kind != "affine":
        raise PeftdeclError(f"quantize_affine needs an affine QuantScheme, got kind {scheme.kind!r}")
    if scheme.bits not in SUPPORTED_BITS:
        raise PeftdeclError(f"MLX affine quantisation takes bits in {SUPPORTED_BITS}, got {scheme.bits}")
    if scheme.group_size not in SUPPORTED_GROUP_SIZES:
        raise PeftdeclError(
            f"MLX affine quantisation takes group_size in {SUPPORTED_GROUP_SIZES}, got {scheme.group_size}"
        )
    return scheme.bits, scheme.group_size


def _input_dtype(w: np.ndarray, dtype: FloatName | None) -> FloatName:
    if w.dtype == np.float16:
        if dtype not in (None, "float16"):
            raise PeftdeclError(f"a float16 array cannot be quantised as {dtype}")
        return "float16"
    if w.dtype == np.float32:
        if dtype == "float16":
            raise PeftdeclError("pass float16 weights as a float16 array, not float32 with dtype='float16'")
        return dtype or "float32"
    raise PeftdeclError(f"affine quantisation takes float32 or float16 weights, got dtype {w.dtype}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (..., n) → uint32 words (..., n·bits/32): each row one little-endian bit stream, as MLX packs."""
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((codes[..., None].astype(np.uint8) >> shifts) & 1).reshape(
        *codes.shape[:-1], codes.shape[-1] * bits
    )
    packed = np.packbits(stream, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_codes`: uint32 words (..., m) → codes (..., m·32/bits) as uint8."""
    as_bytes = np.ascontiguousarray(words.astype("<u4")).view(np.uint8)
    stream = np.unpackbits(as_bytes, axis=-1, bitorder="little")
    per_code = stream.reshape(*words.shape[:-1], words.shape[-1] * 32 // bits, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (per_code.astype(np.uint16) @ weights).astype(np.uint8)


def _exact_edge(w_min: np.ndarray, w_max: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and bias (float32) that put the group's larger-magnitude edge exactly on a code (2 bits and more)."""
    min_is_edge = np.abs(w_min) > np.abs(w_max)
    step = np.where(min_is_edge, step, -step)
    edge = np.where(min_is_edge, w_min, w_max)
    edge_code = np.rint(edge / step)
    on_code = edge_code != 0
    scale = np.where(on_code, edge / np.where(on_code, edge_code, 1), step).astype(np.float32)
    return scale, np.where(on_code, edge, np.float32(0)).astype(np.float32)


def quantize_affine(w: np.ndarray, scheme: QuantScheme, *, dtype: FloatName | None = None) -> Quantized:
    """Quantise ``w`` (≥ 2-D, last axis a multiple of ``scheme.group_size``) as ``mx.quantize`` does.

    Returns codes (uint32, last axis ·bits/32), scales and ``extras["biases"]`` (last axis /group_size) in the
    input's dtype (float32 holding bfloat16 values for ``dtype="bfloat16"``; a float32 ``w`` is then rounded to
    bfloat16 first, as ``astype(mx.bfloat16)`` does) and ``dtype`` naming that dtype."""
    bits, group_size = _check_scheme(scheme)
    w = np.asarray(w)
    name = _input_dtype(w, dtype)
    if w.ndim < 2:
        raise PeftdeclError(
            f"affine quantisation needs a weight of at least 2 dimensions, got shape {w.shape}"
        )
    if w.shape[-1] % group_size:
        raise PeftdeclError(
            f"the last dimension of a weight of shape {w.shape} is not a multiple of the group size {group_size}"
        )
    if not np.isfinite(w).all():
        raise PeftdeclError(f"cannot quantise a weight of shape {w.shape} holding inf or NaN values")
    values = np.asarray(w, np.float32)
    if name == "bfloat16":
        values = round_to_bfloat16(values)
    groups = values.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)

    n_bins = np.float32((1 << bits) - 1)
    w_min = groups.min(axis=-1)
    w_max = groups.max(axis=-1)
    with np.errstate(over="ignore"):
        step = np.maximum((w_max - w_min) / n_bins, _MIN_SCALE)
    if not np.isfinite(step).all():
        # MLX would store an infinite scale here and dequantise the whole group to NaN
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(step))[0])
        raise PeftdeclError(
            f"cannot quantise a weight of shape {w.shape}: its group {where} spans more than float32's range "
            f"(max − min = {float(w_max[where]):g} − {float(w_min[where]):g} overflows)"
        )
    # a huge constant group overflows edge / step: scale 0, codes 0/0 → 0, the bias holds it (as in MLX)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale, bias = (step, w_min) if bits == 1 else _exact_edge(w_min, w_max, step)
        codes = np.rint((groups - bias[..., None]) / scale[..., None])
    codes = np.clip(np.nan_to_num(codes, nan=0.0), 0, n_bins).astype(np.uint8).reshape(w.shape)

    out_dtype = np.float16 if name == "float16" else np.float32
    return Quantized(
        scheme=scheme,
        codes=pack_codes(codes, bits),
        scales=_round_to(scale, name).astype(out_dtype),
        shape=tuple(w.shape),
        extras={"biases": _round_to(bias, name).astype(out_dtype)},
        dtype=name,
    )


def _stored_dtype(q: Quantized) -> FloatName:
    """The dtype ``q``'s scales stand for (``Quantized.dtype``)."""
    for name in _FLOAT_NAMES:
        if q.dtype == name:
            return name
    raise PeftdeclError(f"an affine Quantized's dtype must be one of {_FLOAT_NAMES}, got {q.dtype!r}")


def dequantize_affine(q: Quantized) -> np.ndarray:
    """The weights ``mx.dequantize`` returns for ``q``: s · code + β per group, rounded to the dtype after the
    product and after the sum (float32 holding bfloat16 values for bfloat16)."""
    bits, group_size = _check_scheme(q.scheme)
    if "biases" not in q.extras:
        raise PeftdeclError("an affine Quantized needs extras['biases']")
    name = _stored_dtype(q)
    shape = tuple(q.shape)
    if len(shape) < 2 or shape[-1] % group_size:
        raise PeftdeclError(f"an affine Quantized of group size {group_size} cannot have shape {shape}")
    expected = {
        "codes": (*shape[:-1], shape[-1] * bits // 32),
        "scales": (*shape[:-1], shape[-1] // group_size),
        "biases": (*shape[:-1], shape[-1] // group_size),
    }
    found = {"codes": q.codes.shape, "scales": q.scales.shape, "biases": q.extras["biases"].shape}
    for part, want in expected.items():
        if tuple(found[part]) != want:
            raise PeftdeclError(
                f"an affine Quantized of shape {shape}, {bits} bits, group size {group_size} needs {part} of "
                f"shape {want}, got {tuple(found[part])}"
            )
    codes = unpack_codes(np.asarray(q.codes), bits).reshape(*shape[:-1], shape[-1] // group_size, group_size)
    scales = np.asarray(q.scales, np.float32)[..., None]
    biases = np.asarray(q.extras["biases"], np.float32)[..., None]
    # MLX's half-precision ops compute in float32 and round the result: once after the product, once after the sum
    with np.errstate(invalid="ignore", over="ignore"):  # an infinite scale times code 0 is NaN, in MLX too
        product = _round_to(scales * codes.astype(np.float32), name).astype(np.float32)
        result = _round_to(product + biases, name)
    return result.reshape(shape)
