"""Quantised weights as their libraries lay them out in a state dict, read into and written from
:class:`~peftdecl.quant.scheme.Quantized`; and the one ``quantize`` / ``dequantize`` entry point over the codecs.

Layouts, for a module ``m`` (``LayerInfo.quantization`` names):

- ``bnb_4bit`` (transformers' ``save_pretrained`` after ``load_in_4bit``): ``m.weight`` uint8 ``(ceil(n/2), 1)``
  packed codes, ``m.weight.absmax`` (float32 per block, or uint8 codes with double quantisation),
  ``m.weight.quant_map`` (16 float32), with double quantisation ``m.weight.nested_absmax`` and
  ``m.weight.nested_quant_map`` (256 float32), and ``m.weight.quant_state.bitsandbytes__<nf4|fp4>``: uint8 bytes
  of the JSON bitsandbytes' ``QuantState.as_dict(packed=True)`` writes (quant type, block size, dtype, shape,
  nested block size / dtype / offset).
- ``bnb_8bit``: ``m.weight`` int8 ``(out, in)``, ``m.SCB`` float32 per row, ``m.weight_format`` (uint8 0: row).
- ``mlx_affine`` (mlx-lm): ``m.weight`` uint32 packed codes, ``m.scales`` and ``m.biases`` per group; bits and
  group size are not in the tensors (mlx-lm keeps them in config.json's ``quantization``) and must be given.

Writing back gives the same keys, dtypes, shapes and JSON bytes as the library, so a round trip is byte-identical.
NumPy has no bfloat16: MLX bfloat16 scales are read into float32 arrays holding the same values
(``Quantized.dtype == "bfloat16"``) and written back as such float32 arrays.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.quant.affine import FloatName, dequantize_affine, quantize_affine, round_to_bfloat16
from peftdecl.quant.bnb4 import dequantize_4bit, quantize_4bit
from peftdecl.quant.int8 import dequantize_int8, quantize_int8
from peftdecl.quant.scheme import Quantized, QuantScheme

QUANTIZATIONS = ("bnb_4bit", "bnb_8bit", "mlx_affine")
"""The layouts this module reads and writes (``LayerInfo.quantization`` / ``QuantScheme.name`` values)."""
QUANT_STATE = "weight.quant_state.bitsandbytes__"
"""The suffix (after ``<module>.``) of bitsandbytes' packed 4-bit quant-state JSON, followed by nf4 or fp4."""
_FLOATS: tuple[FloatName, ...] = ("float32", "float16", "bfloat16")
_ROW_FORMAT = 0  # bitsandbytes' weight_format code of the row-major int8 layout, the only one it still writes


def quantized_from_tensors(
    tensors: Mapping[str, Any],
    module: str,
    quantization: str,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    threshold: float = 0.0,
    dtype: str | None = None,
) -> Quantized:
    """``module``'s quantised weight read from ``tensors`` (a state dict of NumPy arrays) in ``quantization``'s
    layout. ``bits``/``group_size``: MLX affine only (required there); ``threshold``: the int8 outlier threshold
    (``llm_int8_threshold``; not stored in the tensors, it does not change the codes); ``dtype``: MLX affine
    only, ``"bfloat16"`` when float32 scales and biases hold bfloat16 values (NumPy has no bfloat16, so
    :func:`tensors_from_quantized` writes them so). A missing or malformed
    tensor raises :class:`~peftdecl.errors.PeftdeclError` naming its full key and what was expected."""
    if quantization == "bnb_4bit":
        return _read_bnb_4bit(tensors, module)
    if quantization == "bnb_8bit":
        return _read_bnb_8bit(tensors, module, threshold)
    if quantization == "mlx_affine":
        if bits is None or group_size is None:
            raise PeftdeclError(
                f"{module}.weight: an MLX affine-quantised weight needs bits and group_size (mlx-lm keeps them "
                f"in config.json's 'quantization'); got bits={bits}, group_size={group_size}"
            )
        return _read_mlx_affine(tensors, module, bits, group_size, dtype)
    raise PeftdeclError(f"{module}: unknown quantisation {quantization!r}; expected one of {QUANTIZATIONS}")


def tensors_from_quantized(module: str, q: Quantized) -> dict[str, np.ndarray]:
    """The state-dict tensors of ``module`` holding ``q``, keyed, typed and shaped as its library saves them
    (the inverse of :func:`quantized_from_tensors`)."""
    if q.scheme.kind in ("nf4", "fp4"):
        return _write_bnb_4bit(module, q)
    if q.scheme.kind == "int8":
        return {
            f"{module}.weight": np.asarray(q.codes, np.int8),
            f"{module}.SCB": np.asarray(q.scales, np.float32),
            f"{module}.weight_format": np.array(_ROW_FORMAT, np.uint8),
        }
    stored = np.float16 if q.dtype == "float16" else np.float32
    return {
        f"{module}.weight": np.asarray(q.codes, np.uint32),
        f"{module}.scales": np.asarray(q.scales, stored),
        f"{module}.biases": np.asarray(q.extras["biases"], stored),
    }


def quantize(w: np.ndarray, scheme: QuantScheme, *, dtype: str = "float32") -> Quantized:
    """``w`` quantised with ``scheme`` by the matching codec, as the library quantises a weight held in ``dtype``
    (``w`` is rounded to ``dtype`` first; bfloat16 kept in float32). int8's SCB is float32 whatever ``dtype``."""
    name = _float_name(dtype, "quantize")
    values = np.asarray(w, np.float32)
    if name == "bfloat16":
        values = round_to_bfloat16(values)
    elif name == "float16":
        values = np.asarray(w).astype(np.float16)
    if scheme.kind in ("nf4", "fp4"):
        return dataclasses.replace(quantize_4bit(values, scheme), dtype=name)
    if scheme.kind == "int8":
        return quantize_int8(values, scheme)
    if name == "float16":
        return quantize_affine(values, scheme)
    return quantize_affine(values, scheme, dtype=name)


def dequantize(q: Quantized) -> np.ndarray:
    """The weight ``q`` stands for, as its library dequantises it: 4-bit ``absmax · T[code]`` rounded to
    ``q.dtype`` (bitsandbytes' ``dequantize_4bit``), int8 ``code · SCB / 127`` in float32
    (``int8_vectorwise_dequant``), affine ``scale · code + bias`` in ``q.dtype`` (``mx.dequantize``). float16
    comes back as float16, bfloat16 as float32 holding bfloat16 values."""
    if q.scheme.kind in ("nf4", "fp4"):
        weights = dequantize_4bit(q)
        name = _float_name(q.dtype, "dequantize")
        if name == "bfloat16":
            return round_to_bfloat16(weights)
        return weights.astype(np.float16) if name == "float16" else weights
    if q.scheme.kind == "int8":
        return dequantize_int8(q)
    return dequantize_affine(q)


# -- bitsandbytes 4-bit --------------------------------------------------------------------------------------
def _read_bnb_4bit(tensors: Mapping[str, Any], module: str) -> Quantized:
    prefix = f"{module}.{QUANT_STATE}"
    found = [key for key in (prefix + "nf4", prefix + "fp4") if key in tensors]
    if len(found) != 1:
        raise PeftdeclError(
            f"{prefix}nf4 (or {prefix}fp4): expected exactly one bitsandbytes 4-bit quant-state tensor, "
            f"found {len(found)}"
        )
    state_key = found[0]
    kind = state_key.rsplit("__", 1)[1]
    state = _quant_state(tensors[state_key], state_key)
    blocksize = _field(state, "blocksize", int, state_key)
    dtype = _field(state, "dtype", str, state_key)
    shape = _field(state, "shape", list, state_key)
    if state.get("quant_type") != kind or dtype not in _FLOATS or not all(isinstance(d, int) for d in shape):
        raise PeftdeclError(
            f"{state_key}: expected quant_type {kind!r}, dtype one of {_FLOATS} and an integer shape; got "
            f"{state.get('quant_type')!r}, {dtype!r}, {shape!r}"
        )
    n = int(np.prod(shape))
    blocks = -(-n // blocksize)
    double = "nested_offset" in state
    weight = _tensor(tensors, f"{module}.weight", np.uint8, ((n + 1) // 2, 1), "packed 4-bit codes")
    if double:
        absmax = _tensor(
            tensors, f"{module}.weight.absmax", np.uint8, (blocks,), "absmax codes (double quantisation)"
        )
    else:
        absmax = _plain_absmax(tensors, f"{module}.weight.absmax", blocks)
    quant_map = _tensor(tensors, f"{module}.weight.quant_map", np.float32, (16,), "the 16-value code table")
    extras = {"quant_map": quant_map}
    scheme = QuantScheme(kind, block_size=blocksize)  # type: ignore[arg-type]  # kind is nf4 or fp4
    if double:
        nested_block = _field(state, "nested_blocksize", int, state_key)
        if state.get("nested_dtype") != "float32" or not isinstance(state["nested_offset"], (int, float)):
            raise PeftdeclError(
                f"{state_key}: expected nested_dtype 'float32' and a numeric nested_offset; got "
                f"{state.get('nested_dtype')!r}, {state['nested_offset']!r}"
            )
        extras |= {
            "offset": np.array(state["nested_offset"], np.float32),
            "nested_absmax": _tensor(
                tensors,
                f"{module}.weight.nested_absmax",
                np.float32,
                (-(-blocks // nested_block),),
                "the absmax of each block of absmax codes",
            ),
            "nested_quant_map": _tensor(
                tensors, f"{module}.weight.nested_quant_map", np.float32, (256,), "the 256-value dynamic map"
            ),
        }
        scheme = dataclasses.replace(scheme, double_quant=True, nested_block_size=nested_block)
    return Quantized(scheme, weight, absmax, tuple(shape), extras, dtype)


def _write_bnb_4bit(module: str, q: Quantized) -> dict[str, np.ndarray]:
    state: dict[str, object] = {
        "quant_type": q.scheme.kind,
        "blocksize": q.scheme.block_size,
        "dtype": q.dtype,
        "shape": list(q.shape),
    }
    out = {
        f"{module}.weight": np.asarray(q.codes, np.uint8),
        f"{module}.weight.absmax": np.asarray(q.scales, np.uint8 if q.scheme.double_quant else np.float32),
        f"{module}.weight.quant_map": np.asarray(q.extras["quant_map"], np.float32),
    }
    if q.scheme.double_quant:
        out[f"{module}.weight.nested_absmax"] = np.asarray(q.extras["nested_absmax"], np.float32)
        out[f"{module}.weight.nested_quant_map"] = np.asarray(q.extras["nested_quant_map"], np.float32)
        state |= {
            "nested_blocksize": q.scheme.nested_block_size,
            "nested_dtype": "float32",
            # bitsandbytes writes the float32 offset's Python float (exact), so the JSON digits match
            "nested_offset": float(np.float32(q.extras["offset"])),
        }
    # json.dumps' default separators, as bitsandbytes' pack_dict_to_tensor writes the state
    out[f"{module}.{QUANT_STATE}{q.scheme.kind}"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return out


def _plain_absmax(tensors: Mapping[str, Any], key: str, blocks: int) -> np.ndarray:
    """The float32 absmax per block. bitsandbytes 0.50 saves a layer it repacked for AVX512-BF16 CPUs (after an
    eval forward) with this absmax as bfloat16 of shape (1, blocks); it dequantises that in float32 on reload, so
    it is read here too (bfloat16 as an ml_dtypes array, or converted to float32 by the caller)."""
    array = _present(tensors, key, f"the absmax per block, float32 of shape [{blocks}]")
    if array.dtype.name not in ("float32", "bfloat16") or array.size != blocks or array.ndim > 2:
        raise PeftdeclError(
            f"{key}: expected the absmax per block, float32 of shape [{blocks}]; got {array.dtype} of shape "
            f"{list(array.shape)}"
        )
    return array.astype(np.float32).reshape(blocks)


def _quant_state(value: Any, key: str) -> dict[str, Any]:
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise PeftdeclError(
            f"{key}: expected a 1-D uint8 tensor of JSON bytes, got {array.dtype} of shape {list(array.shape)}"
        )
    try:
        state = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PeftdeclError(f"{key}: does not hold bitsandbytes' quant-state JSON ({error})") from None
    if not isinstance(state, dict):
        raise PeftdeclError(f"{key}: expected a JSON object, got {type(state).__name__}")
    return state


def _field(state: Mapping[str, Any], name: str, kind: type, key: str) -> Any:
    value = state.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PeftdeclError(f"{key}: the quant-state JSON needs {name!r} ({kind.__name__}), got {value!r}")
    return value


# -- bitsandbytes int8 and MLX affine ------------------------------------------------------------------------
def _read_bnb_8bit(tensors: Mapping[str, Any], module: str, threshold: float) -> Quantized:
    codes = _tensor(tensors, f"{module}.weight", np.int8, None, "int8 codes (out, in)")
    if codes.ndim != 2:
        raise PeftdeclError(f"{module}.weight: expected int8 codes (out, in), got shape {list(codes.shape)}")
    scb = _tensor(tensors, f"{module}.SCB", np.float32, (codes.shape[0],), "the absmax (SCB) per row")
    key = f"{module}.weight_format"
    if key in tensors:
        fmt = np.asarray(tensors[key])
        if fmt.size != 1 or fmt.reshape(-1)[0] not in (_ROW_FORMAT, "row"):
            raise PeftdeclError(f"{key}: only the row-major int8 layout (0, 'row') is read, got {fmt!r}")
    scheme = QuantScheme("int8", threshold=threshold)
    return Quantized(scheme, codes, scb, tuple(codes.shape), {"outlier_cols": np.zeros(0, np.int64)})


def _read_mlx_affine(
    tensors: Mapping[str, Any], module: str, bits: int, group_size: int, held: str | None
) -> Quantized:
    words = _tensor(tensors, f"{module}.weight", np.uint32, None, "packed uint32 codes")
    if words.ndim < 2 or (words.shape[-1] * 32) % bits:
        raise PeftdeclError(
            f"{module}.weight: expected packed uint32 codes of {bits} bits, at least 2-D, got shape "
            f"{list(words.shape)}"
        )
    shape = (*words.shape[:-1], words.shape[-1] * 32 // bits)
    groups = (*shape[:-1], shape[-1] // group_size)
    if shape[-1] % group_size:
        raise PeftdeclError(
            f"{module}.weight: {shape[-1]} input features ({bits} bits) are not a multiple of the group size "
            f"{group_size}"
        )
    scales, dtype = _float_tensor(tensors, f"{module}.scales", groups)
    biases, bias_dtype = _float_tensor(tensors, f"{module}.biases", groups)
    if bias_dtype != dtype:
        raise PeftdeclError(f"{module}.biases: expected the scales' dtype {dtype}, got {bias_dtype}")
    if held == "bfloat16" and dtype == "float32":
        for key, values in ((f"{module}.scales", scales), (f"{module}.biases", biases)):
            if not np.array_equal(round_to_bfloat16(values), values):
                raise PeftdeclError(
                    f"{key}: dtype='bfloat16' was given, but the values are not bfloat16 values"
                )
        dtype = "bfloat16"
    elif held not in (None, dtype):
        raise PeftdeclError(f"{module}.scales: stored as {dtype}, cannot be read as {held}")
    scheme = QuantScheme("affine", bits=bits, group_size=group_size)
    return Quantized(scheme, words, scales, shape, {"biases": biases}, dtype)


def _float_tensor(
    tensors: Mapping[str, Any], key: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, FloatName]:
    array = _present(tensors, key, f"float scales/biases of shape {list(shape)}")
    name = array.dtype.name
    if name not in _FLOATS or array.shape != shape:
        raise PeftdeclError(
            f"{key}: expected float16/bfloat16/float32 of shape {list(shape)}, got {name} of shape "
            f"{list(array.shape)}"
        )
    held = array if name == "float16" else array.astype(np.float32)  # bfloat16 (ml_dtypes) kept in float32
    return held, _float_name(name, key)


def _tensor(
    tensors: Mapping[str, Any], key: str, dtype: type, shape: tuple[int, ...] | None, what: str
) -> np.ndarray:
    array = _present(tensors, key, what)
    if array.dtype != dtype or (shape is not None and array.shape != shape):
        expected = f"{np.dtype(dtype).name}" + ("" if shape is None else f" of shape {list(shape)}")
        raise PeftdeclError(
            f"{key}: expected {what}, {expected}; got {array.dtype} of shape {list(array.shape)}"
        )
    return array


def _present(tensors: Mapping[str, Any], key: str, what: str) -> np.ndarray:
    if key not in tensors:
        raise PeftdeclError(f"{key}: missing; expected {what}")
    return np.asarray(tensors[key])


def _float_name(name: str, where: str) -> FloatName:
    for known in _FLOATS:
        if name == known:
            return known
    raise PeftdeclError(f"{where}: dtype {name!r} is not one of {_FLOATS}")
