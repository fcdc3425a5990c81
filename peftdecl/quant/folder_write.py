"""``peftdecl quantize``: a float HF checkpoint folder quantised into the folder transformers or mlx-lm writes.

- bitsandbytes (``nf4``/``fp4``/``int8``): what ``AutoModelForCausalLM.from_pretrained(src,
  quantization_config=BitsAndBytesConfig(...), device_map="cpu").save_pretrained(out)`` writes: every linear layer
  of the decoder blocks quantised (transformers keeps the embeddings and the output head in float), the same
  tensor names, dtypes and bytes, and ``config.json`` with the ``quantization_config`` transformers reads back.
  LLM.int8 weights are quantised after rounding to float16, as bitsandbytes' ``Int8Params`` does.
- mlx-lm (``affine``): what ``mlx_lm.convert(src, out, quantize=True, q_bits=b, q_group_size=g)`` writes: the
  floats first cast to ``config.json``'s ``torch_dtype``, then every linear and embedding weight whose input size
  is a multiple of the group size quantised (the output head too, unless it is tied to the embeddings, when it
  is dropped), and ``quantization`` {group_size, bits, mode} in a config sorted and indented as mlx-lm does.

The codes come from the NumPy codecs (:mod:`peftdecl.quant.layouts`), bit-identical to the libraries'; the
folder is written all or nothing (:func:`peftdecl.merged_checkpoint.new_folder`), with the source's tokenizer
files and generation config. The whole model is held in memory while it is converted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftdecl._json import JsonObject
from peftdecl.errors import PeftdeclError
from peftdecl.formats.safetensors_io import read_safetensors
from peftdecl.merged_checkpoint import carried_files, new_folder
from peftdecl.quant import layouts
from peftdecl.quant.affine import SUPPORTED_GROUP_SIZES, round_to_bfloat16
from peftdecl.quant.folder import check_quantized_folder, read_config, tensor_headers
from peftdecl.quant.scheme import Quantized, QuantKind, QuantScheme

FLOAT_CODES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
NUMPY_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "bool": "BOOL",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Architectures whose 2-D weights are all linear layers but the input embedding and the output head, under the
same names in transformers and mlx-lm: so which weights each library quantises follows from the names alone."""
EMBEDDING_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")
MLX_AFFINE_BITS = (2, 3, 4, 5, 6, 8)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SHARD_BYTES = 5 << 30
"""Largest safetensors file written (transformers' and mlx-lm's default; a larger tensor gets a file alone)."""


@dataclass(frozen=True)
class QuantizedFolder:
    """What :func:`quantize_folder` wrote: the folder, its quantisation (``bnb_4bit``, ``bnb_8bit``,
    ``mlx_affine``), the quantised weights' names and the bytes of its safetensors files."""

    out: Path
    quantization: str
    quantized: tuple[str, ...]
    weight_bytes: int


@dataclass(frozen=True)
class _Tensor:
    """A tensor to write: float values (bfloat16 held in float32) or integer codes, and its safetensors dtype."""

    values: np.ndarray
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.values.size * (2 if self.dtype == "BF16" else self.values.itemsize)

    def encoded(self) -> bytes:
        if self.dtype == "BF16":
            bits = round_to_bfloat16(self.values).view(np.uint32) >> 16
            return np.ascontiguousarray(bits.astype("<u2")).tobytes()
        return np.ascontiguousarray(self.values, dtype=self.values.dtype.newbyteorder("<")).tobytes()


def check_request(
    kind: str, bits: int, group_size: int, double_quant: bool, compute_dtype: str | None
) -> None:
    """Refuse a combination neither library writes: nf4/fp4 are 4-bit, int8 8-bit, affine 2–8 bits in groups of
    32/64/128; bitsandbytes fixes its block size (64), MLX has no double quantisation or compute dtype."""
    if kind in ("nf4", "fp4", "int8"):
        want = 8 if kind == "int8" else 4
        if bits != want:
            raise PeftdeclError(f"bits {bits}: bitsandbytes {kind} is {want}-bit")
        if double_quant and kind == "int8":
            raise PeftdeclError("double_quant: bitsandbytes double quantisation is for 4-bit (nf4/fp4) only")
        if compute_dtype is not None and kind == "int8":
            raise PeftdeclError("compute_dtype: bitsandbytes takes a compute dtype for 4-bit (nf4/fp4) only")
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise PeftdeclError(
                f"compute_dtype {compute_dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}"
            )
    elif kind == "affine":
        if bits not in MLX_AFFINE_BITS:
            raise PeftdeclError(f"bits {bits}: MLX affine quantisation takes {MLX_AFFINE_BITS}")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise PeftdeclError(
                f"group_size {group_size}: MLX affine quantisation takes {SUPPORTED_GROUP_SIZES}"
            )
        if double_quant or compute_dtype is not None:
            raise PeftdeclError(
                "double_quant and compute_dtype are bitsandbytes settings, not MLX affine ones"
            )
    else:
        raise PeftdeclError(f"kind {kind!r}: expected nf4, fp4, int8 or affine")


def quantize_folder(
    model: Path,
    out: Path,
    *,
    bits: int,
    kind: QuantKind,
    group_size: int = 64,
    double_quant: bool = False,
    compute_dtype: str | None = None,
) -> QuantizedFolder:
    """Quantise the float checkpoint folder ``model`` into the new folder ``out``: bitsandbytes' layout for
    ``kind`` nf4/fp4/int8 (block size 64), mlx-lm's for ``affine`` (``bits``, ``group_size``). ``out`` must be
    absent or empty; a source that is already quantised, or of an architecture not in
    :data:`SUPPORTED_MODEL_TYPES`, is refused."""
    model, out = Path(model), Path(out)
    check_request(kind, bits, group_size, double_quant, compute_dtype)
    config = read_config(model)
    already = check_quantized_folder(model)
    if already is not None:
        raise PeftdeclError(f"{model}: already quantised ({already}); quantise a float checkpoint")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PeftdeclError(
            f"{model / 'config.json'}: model_type {model_type!r}: peftdecl quantize knows which layers "
            f"transformers and mlx-lm quantise for {', '.join(SUPPORTED_MODEL_TYPES)} only"
        )
    tensors = _read_tensors(model)
    if kind == "affine":
        scheme = QuantScheme("affine", bits=bits, group_size=group_size)
        written, quantized, new_config, metadata = _mlx_layout(model, config, tensors, scheme)
    else:
        scheme = QuantScheme(kind, double_quant=double_quant)
        written, quantized, new_config, metadata = _bnb_layout(model, config, tensors, scheme, compute_dtype)
    with new_folder(out) as stage:
        size = _write_shards(stage, written, metadata, mlx_index=kind == "affine")
        indent = 4 if kind == "affine" else 2
        text = json.dumps(new_config, indent=indent, sort_keys=kind != "affine")
        (stage / "config.json").write_text(text if kind == "affine" else text + "\n", encoding="utf-8")
        for path in carried_files(model):
            shutil.copy2(path, stage / path.name)
    return QuantizedFolder(out, scheme.name, tuple(quantized), size)


def _read_tensors(folder: Path) -> dict[str, _Tensor]:
    """Every tensor of the folder with its stored safetensors dtype (bfloat16 widened to float32 exactly)."""
    headers = tensor_headers(folder)
    tensors: dict[str, _Tensor] = {}
    for path in sorted({h.file for h in headers.values()}):
        values, _ = read_safetensors(path, floats_only=False)
        tensors |= {name: _Tensor(array, headers[name].dtype) for name, array in values.items()}
    return tensors


def _cast(tensor: _Tensor, dtype: str | None) -> _Tensor:
    """A float tensor cast to ``dtype`` (round to nearest even, as torch and MLX cast); others unchanged."""
    if dtype is None or tensor.dtype not in FLOAT_CODES or FLOAT_CODES[tensor.dtype] == dtype:
        return tensor
    if dtype == "bfloat16":
        return _Tensor(round_to_bfloat16(tensor.values.astype(np.float32)), "BF16")
    return _Tensor(tensor.values.astype(dtype), NUMPY_CODES[dtype])


def _kept(tensors: dict[str, _Tensor], *, drop_tied_head: bool) -> list[tuple[str, _Tensor]]:
    """The tensors the library saves again, by name: never RoPE's precomputed ``inv_freq`` (a buffer, not a
    weight); with ``drop_tied_head`` not ``lm_head.weight`` either (mlx-lm's Llama-family ``sanitize`` drops a
    head the config ties to the embeddings; transformers 5 loads such a head untied and saves it)."""
    return [
        (name, tensor)
        for name, tensor in sorted(tensors.items())
        if "rotary_emb.inv_freq" not in name and not (drop_tied_head and name == "lm_head.weight")
    ]


def _quantize_weight(model: Path, name: str, tensor: _Tensor, scheme: QuantScheme, held: str) -> Quantized:
    """``layouts.quantize`` of one weight held in ``held``, its errors (inf/NaN, float64) naming the tensor."""
    if held == "float64":
        raise PeftdeclError(f"{model}: {name} is float64; neither library quantises float64 weights")
    try:
        return layouts.quantize(tensor.values, scheme, dtype=held)
    except PeftdeclError as exc:
        raise PeftdeclError(f"{model}: {name}: {exc}") from None


def _is_2d_float_weight(name: str, tensor: _Tensor) -> bool:
    return name.endswith(".weight") and tensor.dtype in FLOAT_CODES and tensor.values.ndim == 2


def _bnb_layout(
    model: Path,
    config: JsonObject,
    tensors: dict[str, _Tensor],
    scheme: QuantScheme,
    compute_dtype: str | None,
) -> tuple[dict[str, _Tensor], list[str], JsonObject, dict[str, str]]:
    """transformers' bitsandbytes checkpoint: floats in the config's dtype, the linear layers quantised."""
    dtype = _config_dtype(config, ("dtype", "torch_dtype"))
    written: dict[str, _Tensor] = {}
    quantized = []
    for name, tensor in _kept(tensors, drop_tied_head=False):
        tensor = _cast(tensor, dtype)
        if not _is_2d_float_weight(name, tensor) or name in EMBEDDING_WEIGHTS:
            written[name] = tensor
            continue
        module = name.removesuffix(".weight")
        # bitsandbytes' Int8Params quantises the weight rounded to float16, whatever the model's dtype
        held = "float16" if scheme.kind == "int8" else FLOAT_CODES[tensor.dtype]
        q = _quantize_weight(model, name, tensor, scheme, held)
        for key, array in layouts.tensors_from_quantized(module, q).items():
            written[key] = _Tensor(array, NUMPY_CODES[array.dtype.name])
        quantized.append(module)
    four = scheme.kind != "int8"
    new_config = dict(config)
    new_config["quantization_config"] = {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": compute_dtype or "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": scheme.kind if four else "fp4",
        "bnb_4bit_use_double_quant": scheme.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }
    return written, quantized, new_config, {"format": "pt"}


def _mlx_layout(
    model: Path, config: JsonObject, tensors: dict[str, _Tensor], scheme: QuantScheme
) -> tuple[dict[str, _Tensor], list[str], JsonObject, dict[str, str]]:
    """mlx-lm's converted checkpoint: floats cast to ``torch_dtype``, linear and embedding weights quantised."""
    text_config = config.get("text_config")
    dtype = _config_dtype(config, ("torch_dtype",))
    if dtype is None and isinstance(text_config, dict):
        dtype = _config_dtype(text_config, ("dtype",))
    written: dict[str, _Tensor] = {}
    quantized = []
    for name, tensor in _kept(tensors, drop_tied_head=bool(config.get("tie_word_embeddings"))):
        tensor = _cast(tensor, dtype)
        if not _is_2d_float_weight(name, tensor) or tensor.values.shape[-1] % scheme.group_size:
            written[name] = tensor
            continue
        module = name.removesuffix(".weight")
        float_dtype = FLOAT_CODES[tensor.dtype]
        q = _quantize_weight(model, name, tensor, scheme, float_dtype)
        for key, array in layouts.tensors_from_quantized(module, q).items():
            code = "BF16" if float_dtype == "bfloat16" and array.dtype == np.float32 else None
            written[key] = _Tensor(array, code or NUMPY_CODES[array.dtype.name])
        quantized.append(module)
    new_config = {k: v for k, v in config.items() if k not in ("_name_or_path", "vision_config")}
    eos = _generation_eos(model)
    if eos:
        new_config["eos_token_id"] = eos
    settings = {"group_size": scheme.group_size, "bits": scheme.bits, "mode": "affine"}
    new_config["quantization"] = settings
    new_config["quantization_config"] = dict(settings)
    return written, quantized, dict(sorted(new_config.items())), {"format": "mlx"}


def _config_dtype(config: JsonObject, keys: tuple[str, ...]) -> str | None:
    """The float dtype a config names under the first of ``keys`` it has (None when it names none)."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in COMPUTE_DTYPES:
            return value.removeprefix("torch.")
        if value is not None:
            return None
    return None


def _generation_eos(model: Path) -> object:
    """generation_config.json's eos_token_id, which mlx-lm copies into the config it writes."""
    path = model / "generation_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data.get("eos_token_id") if isinstance(data, dict) else None


def _write_safetensors(path: Path, tensors: dict[str, _Tensor], metadata: dict[str, str]) -> int:
    """One safetensors file: little-endian u64 header length, the JSON header padded with spaces to 8 bytes,
    then the tensors' bytes in header order, written one tensor at a time; returns the tensor bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        header[name] = {
            "dtype": tensors[name].dtype,
            "shape": list(tensors[name].values.shape),
            "data_offsets": [offset, offset + tensors[name].nbytes],
        }
        offset += tensors[name].nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        for name in sorted(tensors):
            handle.write(tensors[name].encoded())
    return offset


def _write_shards(
    stage: Path, tensors: dict[str, _Tensor], metadata: dict[str, str], *, mlx_index: bool
) -> int:
    """``model.safetensors``, or shards of at most :data:`SHARD_BYTES` with ``model.safetensors.index.json``
    (mlx-lm writes the index even for one file); returns the bytes of tensor data written."""
    shards: list[dict[str, _Tensor]] = []
    size = 0
    for name in sorted(tensors):
        if not shards or size + tensors[name].nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    total = 0
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(stage / file, shard, metadata)
        weight_map |= dict.fromkeys(shard, file)
    if len(shards) > 1 or mlx_index:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=4 if mlx_index else 2))
    return total
