"""Quantised model folders as transformers (bitsandbytes) and mlx-lm save them: which scheme a folder declares,
and whether every quantised weight in its safetensors files carries its quantisation state.

A folder declares its scheme in ``config.json``: ``quantization_config`` with ``quant_method: "bitsandbytes"`` and
``load_in_4bit``/``load_in_8bit`` (transformers), or ``quantization`` {``group_size``, ``bits``[, ``mode``]}
(mlx-lm). Per weight ``<m>.weight`` the files then hold:

- ``bnb_4bit``: ``<m>.weight`` (packed codes), ``<m>.weight.absmax``, ``<m>.weight.quant_map``,
  ``<m>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``: JSON bytes with the block size, dtype and shape), and
  with double quantisation ``<m>.weight.nested_absmax`` and ``<m>.weight.nested_quant_map``;
- ``bnb_8bit``: ``<m>.weight`` (int8 codes), ``<m>.SCB`` (row absmax) and ``<m>.weight_format``;
- ``mlx_affine``: ``<m>.weight`` (uint32 words), ``<m>.scales`` and ``<m>.biases``.

Only the safetensors headers are read (and the few bytes of each 4-bit ``quant_state``), never the weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peftdecl._json import JsonObject
from peftdecl.errors import PeftdeclError
from peftdecl.formats.safetensors_io import read_safetensors_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QUANT_STATE = "quant_state.bitsandbytes__"
BNB_4BIT_STATE = ("absmax", "quant_map")
BNB_NESTED_STATE = ("nested_absmax", "nested_quant_map")
STORAGE_CODES = {
    "uint8": "U8",
    "int8": "I8",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
}
"""bitsandbytes' ``bnb_4bit_quant_storage`` dtype names -> the safetensors dtype the packed codes are stored as."""


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in a safetensors header: the file holding it, its dtype code (``F32``, ``BF16``, ``U8``,
    ...) and its shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_config(folder: Path) -> JsonObject:
    """The folder's ``config.json`` as a JSON object (PeftdeclError naming the file when absent or malformed)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PeftdeclError(f"{path}: not found (expected a HF checkpoint folder)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PeftdeclError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PeftdeclError(f"{path}: expected a JSON object")
    return config


def folder_quantization(config: JsonObject, path: Path) -> str | None:
    """The scheme ``config`` (read from ``path``) declares: ``bnb_4bit``, ``bnb_8bit``, ``mlx_affine``, or None
    for a float checkpoint; a quantisation peftdecl cannot run (GPTQ, AWQ, MLX's fp4 modes, ...) is refused."""
    mlx = config.get("quantization")
    hf = config.get("quantization_config")
    if mlx is None and isinstance(hf, dict) and "quant_method" not in hf and "bits" in hf:
        mlx = hf  # mlx-lm writes its settings under both keys; a folder may keep only the HF one
    if mlx is not None:
        if not isinstance(mlx, dict) or not isinstance(mlx.get("bits"), int):
            raise PeftdeclError(f"{path}: 'quantization' must be an object with integer 'bits', got {mlx!r}")
        mode = mlx.get("mode", "affine")
        if mode != "affine":
            raise PeftdeclError(
                f"{path}: quantization.mode {mode!r}: peftdecl runs MLX's 'affine' quantisation only"
            )
        return "mlx_affine"
    if hf is None:
        return None
    if not isinstance(hf, dict):
        raise PeftdeclError(f"{path}: 'quantization_config' must be an object, got {hf!r}")
    method = hf.get("quant_method")
    if method != "bitsandbytes":
        raise PeftdeclError(
            f"{path}: quantization_config.quant_method {method!r}: peftdecl runs bitsandbytes 4-bit/8-bit and "
            "mlx-lm affine checkpoints only"
        )
    four = bool(hf.get("load_in_4bit") or hf.get("_load_in_4bit"))
    eight = bool(hf.get("load_in_8bit") or hf.get("_load_in_8bit"))
    if four == eight:
        raise PeftdeclError(
            f"{path}: quantization_config must set exactly one of load_in_4bit and load_in_8bit "
            f"(load_in_4bit={four}, load_in_8bit={eight})"
        )
    return "bnb_4bit" if four else "bnb_8bit"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards ``model.safetensors.index.json`` names, else
    ``model.safetensors``."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PeftdeclError(
                f"{index}: not a safetensors index with a 'weight_map' object ({exc})"
            ) from None
        if not names or not all(isinstance(n, str) and n and "/" not in n and n != ".." for n in names):
            raise PeftdeclError(
                f"{index}: weight_map must map tensor names to shard file names in the folder"
            )
        return [folder / name for name in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise PeftdeclError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (expected safetensors weights)")


def tensor_headers(folder: Path) -> dict[str, TensorHeader]:
    """Every tensor of the folder's safetensors files by name (a name in two files is refused)."""
    headers: dict[str, TensorHeader] = {}
    for path in weight_files(folder):
        for name, entry in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
                raise PeftdeclError(f"{path}: corrupt safetensors header entry for {name!r}")
            if name in headers:
                raise PeftdeclError(f"{path}: tensor {name!r} is also in {headers[name].file.name}")
            headers[name] = TensorHeader(path, str(entry.get("dtype")), tuple(int(d) for d in entry["shape"]))
    return headers


def read_tensor_bytes(header: TensorHeader, name: str) -> bytes:
    """The raw bytes of one (small) tensor, read from its file without loading the rest."""
    from safetensors import safe_open

    try:
        with safe_open(str(header.file), framework="numpy") as handle:
            return bytes(handle.get_tensor(name).tobytes())
    except Exception as exc:  # SafetensorError and whatever else a corrupt file raises
        raise PeftdeclError(f"{header.file}: cannot read tensor {name!r} ({exc})") from None


def check_quantized_folder(folder: Path) -> str | None:
    """The quantisation a checkpoint folder declares (``bnb_4bit``, ``bnb_8bit``, ``mlx_affine``; None when it is
    a float checkpoint), after checking that every quantised weight carries its quantisation state: a missing
    key raises PeftdeclError naming the file and the key. A float folder without safetensors files (PyTorch
    ``.bin`` weights) is None; a quantised one must be safetensors, as transformers and mlx-lm save it."""
    folder = Path(folder)
    config = read_config(folder)
    scheme = folder_quantization(config, folder / "config.json")
    has_safetensors = (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()
    if scheme is None:
        if has_safetensors:
            _refuse_stray_state(folder, tensor_headers(folder))
        return None
    headers = tensor_headers(folder)
    if scheme == "bnb_4bit":
        storage = str(config["quantization_config"].get("bnb_4bit_quant_storage") or "uint8")
        quant_type = str(config["quantization_config"].get("bnb_4bit_quant_type") or "fp4")
        found = _check_bnb_4bit(headers, STORAGE_CODES.get(storage, storage), quant_type)
    elif scheme == "bnb_8bit":
        found = _check_with_state(headers, "I8", lambda module: (f"{module}.SCB",))
    else:
        found = _check_with_state(headers, "U32", lambda module: (f"{module}.scales", f"{module}.biases"))
    if not found:
        raise PeftdeclError(
            f"{folder / 'config.json'} declares {scheme} quantisation, but no weight in "
            f"{', '.join(sorted({h.file.name for h in headers.values()}))} is quantised"
        )
    return scheme


def _missing(headers: dict[str, TensorHeader], weight: str, key: str, scheme: str) -> PeftdeclError:
    file = headers[weight].file if weight in headers else headers[key].file
    return PeftdeclError(
        f"{file}: {weight} is quantised ({scheme}) but its quantisation state {key!r} is missing "
        "(the checkpoint is incomplete: save it again with transformers/mlx-lm, or quantise with peftdecl quantize)"
    )


def _check_with_state(
    headers: dict[str, TensorHeader], dtype: str, state_keys: Callable[[str], tuple[str, ...]]
) -> int:
    """int8 and MLX: each ``<m>.weight`` of ``dtype`` needs ``state_keys(m)``; each state key needs its weight."""
    scheme = "bnb_8bit" if dtype == "I8" else "mlx_affine"
    found = 0
    for name, header in sorted(headers.items()):
        if not name.endswith(".weight") or header.dtype != dtype:
            continue
        found += 1
        for key in state_keys(name.removesuffix(".weight")):
            if key not in headers:
                raise _missing(headers, name, key, scheme)
    suffixes = (".SCB",) if dtype == "I8" else (".scales", ".biases")
    for name in sorted(headers):
        if name.endswith(suffixes):
            weight = name.rsplit(".", 1)[0] + ".weight"
            if headers.get(weight) is None or headers[weight].dtype != dtype:
                raise PeftdeclError(
                    f"{headers[name].file}: {name} is quantisation state ({scheme}) of {weight}, which is "
                    + (
                        "missing"
                        if weight not in headers
                        else f"not quantised (dtype {headers[weight].dtype})"
                    )
                )
    return found


def _check_bnb_4bit(headers: dict[str, TensorHeader], storage: str, quant_type: str) -> int:
    """Each packed 4-bit weight (any weight with 4-bit state, or stored as ``storage`` in shape (n, 1)) needs its
    absmax, quant_map, quant_state and, when its quant_state says nested, the nested absmax and map."""
    weights = {
        name
        for name, h in headers.items()
        if name.endswith(".weight") and h.dtype == storage and len(h.shape) == 2 and h.shape[1] == 1
    }
    for name in headers:
        if ".weight." in name and not name.endswith(".weight"):
            weight = name[: name.index(".weight.") + len(".weight")]
            if weight not in headers:
                raise PeftdeclError(
                    f"{headers[name].file}: {name} is 4-bit quantisation state of {weight}, which is missing"
                )
            weights.add(weight)
    for weight in sorted(weights):
        states = [k for k in headers if k.startswith(f"{weight}.{QUANT_STATE}")]
        if not states:
            raise _missing(headers, weight, f"{weight}.{QUANT_STATE}{quant_type}", "bnb_4bit")
        for suffix in BNB_4BIT_STATE:
            if f"{weight}.{suffix}" not in headers:
                raise _missing(headers, weight, f"{weight}.{suffix}", "bnb_4bit")
        state = _quant_state(headers, states[0])
        if any(key.startswith("nested_") for key in state):
            for suffix in BNB_NESTED_STATE:
                if f"{weight}.{suffix}" not in headers:
                    raise _missing(headers, weight, f"{weight}.{suffix}", "bnb_4bit")
    return len(weights)


def _quant_state(headers: dict[str, TensorHeader], key: str) -> JsonObject:
    """A 4-bit weight's packed ``quant_state``: UTF-8 JSON bytes stored as a uint8 tensor."""
    raw = read_tensor_bytes(headers[key], key)
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PeftdeclError(
            f"{headers[key].file}: {key} is not the JSON bitsandbytes writes ({exc})"
        ) from None
    if not isinstance(state, dict):
        raise PeftdeclError(f"{headers[key].file}: {key} is not a JSON object")
    return state


def _refuse_stray_state(folder: Path, headers: dict[str, TensorHeader]) -> None:
    """A float config with bitsandbytes' quantisation state in its files: the config lost its quantisation."""
    for name in sorted(headers):
        if f".{QUANT_STATE}" in name or name.endswith((".weight.absmax", ".SCB")):
            raise PeftdeclError(
                f"{headers[name].file}: holds quantisation state {name!r}, but {folder / 'config.json'} has no "
                "quantization_config (it was dropped from the config?)"
            )
