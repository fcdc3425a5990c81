"""Read and write safetensors files as NumPy arrays, with errors that name the file and the tensor.

Reading parses the format directly (8-byte header length, JSON header, raw little-endian data) so that bfloat16
tensors, which NumPy cannot hold, are widened to float32, and so a truncated file is reported precisely.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from peftdecl.errors import AdapterFileError
from peftdecl.formats.atomic import atomic_write_bytes

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file (bfloat16 widened to float32) and its metadata."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: file not found") from None
    if len(blob) < 8:
        raise AdapterFileError(f"{path}: not a safetensors file (only {len(blob)} bytes)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > min(_MAX_HEADER, len(blob) - 8):
        raise AdapterFileError(
            f"{path}: corrupt or truncated safetensors header (declares {header_len} bytes)"
        )
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(blob)[8 + header_len :]
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _decode_tensor(path, name, entry, data)
    return tensors, metadata


def _decode_tensor(path: Path, name: str, entry: object, data: memoryview) -> np.ndarray:
    try:
        dtype_name, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise AdapterFileError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if end > len(data) or start > end:
        raise AdapterFileError(
            f"{path}: tensor {name!r} lies past the end of the file (truncated: needs byte {end}, has {len(data)})"
        )
    raw = data[start:end]
    count = int(np.prod(shape)) if shape else 1
    if dtype_name == "BF16":
        if len(raw) != 2 * count:
            raise AdapterFileError(
                f"{path}: tensor {name!r} has {len(raw)} bytes for shape {shape} (bfloat16)"
            )
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape).copy()
    if dtype_name not in _DTYPES:
        raise AdapterFileError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
    dtype = np.dtype(_DTYPES[dtype_name]).newbyteorder("<")
    if len(raw) != dtype.itemsize * count:
        raise AdapterFileError(
            f"{path}: tensor {name!r} has {len(raw)} bytes, shape {shape} needs {dtype.itemsize * count}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` atomically, keys sorted, C-contiguous."""
    from safetensors.numpy import save

    ordered = {k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)}
    atomic_write_bytes(Path(path), save(ordered, metadata=dict(metadata)))
