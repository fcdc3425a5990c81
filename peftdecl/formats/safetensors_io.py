"""Read and write safetensors files as NumPy arrays, with errors that name the file and the tensor.

Reading goes through the ``safetensors`` package (memory-mapped; it checks that the header is valid JSON, that the
offsets are integers tiling the data exactly, with no gap, overlap or trailing byte, and that each tensor's bytes
match its shape and dtype). Before the file reaches the library peftdecl refuses what would make it hang or
exhaust memory: anything but a regular file (``/dev/zero``, a FIFO, a folder), a header over
:data:`MAX_HEADER_BYTES`, and a header with more than :data:`MAX_HEADER_ITEMS` JSON items (about 100,000 tensors).
bfloat16, which NumPy cannot hold, is read from the validated offsets and widened to float32 exactly. Every
failure is an :class:`~peftdecl.errors.AdapterFileError` naming the file, and the tensor where there is one.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from peftdecl._json import JsonObject, JsonValue
from peftdecl.errors import AdapterFileError
from peftdecl.formats.atomic import atomic_write_bytes

MAX_HEADER_BYTES = 32 * 1024 * 1024
"""The largest JSON header read (the library allows 100 MB; real headers take ~100 bytes a tensor, and a 100 MB
one would take some 470 MB of memory to parse)."""
MAX_HEADER_ITEMS = 1_000_000
"""A bound on the JSON values in a header, counted as its ``{``, ``[`` and ``,`` bytes (an over-estimate: each
value but the first of a container follows a comma). A tensor entry takes about 8, so this admits ~100,000
tensors while a header with 10⁶ entries is refused in milliseconds, before it is parsed."""
_CHUNK = 1 << 20
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.float32}
"""safetensors dtype -> the NumPy dtype it is read as (bfloat16 widened to float32)."""
OTHER_DTYPES = {"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}
"""Read only with ``floats_only=False`` (base checkpoints may hold integer buffers; adapters never do)."""


def read_safetensors(path: Path, *, floats_only: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file (bfloat16 widened to float32) and its metadata.

    ``floats_only``: refuse any tensor that is not F64/F32/F16/BF16 (what every adapter tensor is)."""
    path = Path(path)
    fd = _open_regular(path)
    try:
        header_len, header = _read_header(path, fd)
        tensors = _load(path, fd, header_len, header, floats_only)
    finally:
        os.close(fd)
    metadata = header.get("__metadata__") or {}
    return tensors, dict(metadata)


def read_safetensors_header(path: Path) -> JsonObject:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets, and ``__metadata__``), bounded
    and checked as :func:`read_safetensors` checks it, without reading a tensor."""
    path = Path(path)
    fd = _open_regular(path)
    try:
        return _read_header(path, fd)[1]
    finally:
        os.close(fd)


def _open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, refusing anything but a regular file (checked on the open file)."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer must not wait; it is refused just below
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise AdapterFileError(f"{path}: is a folder, expected a safetensors file") from None
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot open ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise AdapterFileError(f"{path}: is {what}, expected a safetensors file")
    return fd


def _read_exact(path: Path, fd: int, size: int, offset: int, what: str) -> bytes:
    data = b""
    while len(data) < size:
        try:
            chunk = _pread(fd, size - len(data), offset + len(data))
        except OSError as exc:
            raise AdapterFileError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
        if not chunk:
            raise AdapterFileError(f"{path}: truncated ({what} needs {size} bytes, found {len(data)})")
        data += chunk
    return data


def _pread(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows has no pread
    return os.read(fd, size)


def _read_header(path: Path, fd: int) -> tuple[int, JsonObject]:
    """The header's declared length and parsed JSON, bounded before parsing."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise AdapterFileError(f"{path}: not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", _read_exact(path, fd, 8, 0, "the header length"))
    if header_len > MAX_HEADER_BYTES:
        raise AdapterFileError(
            f"{path}: corrupt safetensors header (declares {header_len} bytes; the limit is {MAX_HEADER_BYTES})"
        )
    if header_len > size - 8:
        raise AdapterFileError(
            f"{path}: corrupt or truncated safetensors header (declares {header_len} bytes, "
            f"the file has {size - 8} after the length)"
        )
    # read in chunks, counting as we go, so that an oversized header is refused before it is all in memory
    chunks, items = [], 0
    for start in range(0, header_len, _CHUNK):
        chunk = _read_exact(path, fd, min(_CHUNK, header_len - start), 8 + start, "the header")
        items += chunk.count(b"{") + chunk.count(b"[") + chunk.count(b",")
        if items > MAX_HEADER_ITEMS:
            raise AdapterFileError(
                f"{path}: safetensors header has too many entries (over {MAX_HEADER_ITEMS} JSON items in its "
                f"first {start + len(chunk)} bytes; the limit allows some 100,000 tensors)"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    del chunks
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterFileError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header_len, header


def _no_duplicates(pairs: list[tuple[str, JsonValue]]) -> JsonObject:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {twice!r} appears twice")
    return out


def _load(
    path: Path, fd: int, header_len: int, header: JsonObject, floats_only: bool
) -> dict[str, np.ndarray]:
    """Validate with the safetensors library, then decode each tensor (BF16 from its checked offsets)."""
    from safetensors import safe_open

    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in entries.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype in FLOAT_DTYPES or (not floats_only and dtype in OTHER_DTYPES):
            continue
        if isinstance(dtype, str) and dtype in OTHER_DTYPES:
            raise AdapterFileError(
                f"{path}: tensor {name!r} has dtype {dtype}; adapter tensors must be floating point "
                f"({', '.join(FLOAT_DTYPES)})"
            )
        if dtype is not None:
            raise AdapterFileError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        # a missing or malformed entry is left to the library, whose message says what is wrong
    _check_extent(path, os.fstat(fd).st_size - 8 - header_len, header_len, entries)
    # the library re-opens the very file validated above (not whatever the path names by now) where it can
    proc = Path(f"/proc/self/fd/{fd}")
    source = proc if proc.exists() else path
    tensors: dict[str, np.ndarray] = {}
    current: str | None = None  # the tensor being read, named if the library fails on it
    try:
        with safe_open(str(source), framework="numpy") as handle:
            if set(handle.keys()) != set(entries):
                raise AdapterFileError(
                    f"{path}: the safetensors library and the header disagree on tensor names"
                )
            for current in sorted(entries):
                if entries[current]["dtype"] == "BF16":
                    tensors[current] = _bf16(path, fd, 8 + header_len, current, entries[current])
                else:
                    tensors[current] = np.array(handle.get_tensor(current), copy=True)
    except AdapterFileError:
        raise
    except Exception as exc:  # SafetensorError, and anything else the library raises on a bad file
        where = f"tensor {current!r}: " if current is not None else ""
        message = str(exc).removeprefix("Error while deserializing header: ")
        raise AdapterFileError(f"{path}: {where}invalid safetensors file ({message})") from None
    return tensors


def _check_extent(path: Path, data_len: int, header_len: int, entries: JsonObject) -> None:
    """Name the tensor a truncated file cuts, or the header length a shifted file gets wrong (the library
    refuses both, less specifically: its check stays the final word on every other offset)."""
    ends = {}
    for name, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        ):
            ends[name] = offsets[1]
    if len(ends) != len(entries) or not ends:
        return
    last = max(ends, key=ends.__getitem__)
    if ends[last] > data_len:
        raise AdapterFileError(
            f"{path}: tensor {last!r} lies past the end of the file (truncated: needs byte {ends[last]} of the "
            f"data, which has {data_len})"
        )
    if ends[last] < data_len:
        raise AdapterFileError(
            f"{path}: {data_len - ends[last]} bytes follow the last tensor {last!r} (corrupt: is the header length "
            f"{header_len} wrong?)"
        )


def _bf16(path: Path, fd: int, data_start: int, name: str, entry: JsonObject) -> np.ndarray:
    """A bfloat16 tensor widened to float32: each value's 16 bits become the high half of a float32."""
    start, end = entry["data_offsets"]  # integers tiling the data: the library checked them
    shape = tuple(entry["shape"])
    raw = _read_exact(path, fd, end - start, data_start + start, f"tensor {name!r}")
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` atomically (fsynced), keys sorted, C-contiguous."""
    from safetensors.numpy import save

    ordered = {k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)}
    atomic_write_bytes(Path(path), save(ordered, metadata=dict(metadata)))
