"""Whole models on MLX for ``peftdecl train``, ``generate`` and ``merge``: load an HF checkpoint folder with
mlx-lm (and its tokenizer with transformers), greedy generation with a KV cache, and the merged model written
back as an HF checkpoint folder.

mlx-lm's Llama-family modules hold their weights under the Hugging Face names, so the merged arrays are written
under their own names; :func:`save_merged` checks every name and shape against the source checkpoint and refuses
an architecture whose names differ rather than write a folder transformers would misread.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.merged_checkpoint import carried_files, check_new_folder, new_folder, refuse_prompt_adapters
from peftdecl.model import AdaptedModel
from peftdecl.quant.folder import check_quantized_folder
from peftdecl.train.config import TORCH_QUANTIZATION, QuantizationConfig
from peftdecl.train.runtime import Tokenizer
from peftdecl_mlx.engine import MlxEngine
from peftdecl_mlx.inventory import flatten

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DEVICES = ("auto", "cpu")
DEFAULT_SHARD_BYTES = 5 << 30
"""Largest safetensors shard :func:`save_merged` writes (a larger single tensor gets a shard of its own)."""
MAX_HEADER_BYTES = 100_000_000
"""The safetensors format's own limit on a header."""


def load_pretrained(
    directory: Path, *, device: str, dtype: str, quantization: QuantizationConfig | None = None
) -> tuple[nn.Module, Tokenizer]:
    """The mlx-lm model of a local HF checkpoint folder, its floating arrays cast to ``dtype``, and the folder's
    tokenizer as ``transformers.AutoTokenizer`` loads it (so the data is tokenised as on torch).

    ``quantization`` (``bits``, ``group_size``) then quantises the cast model as ``mlx_lm.convert -q`` does
    (:func:`quantize_like_mlx_lm`); an mlx-lm quantised folder (config.json ``quantization``) loads quantised
    without it. ``device``: auto (MLX's default device) or cpu (made the default device); cuda is torch's."""
    folder = Path(directory)
    if device not in DEVICES:
        raise PeftdeclError(
            f"device {device!r}: the mlx backend runs on {' or '.join(DEVICES)} (cuda is torch's)"
        )
    if dtype not in DTYPES:
        raise PeftdeclError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    if not (folder / "config.json").is_file():
        raise PeftdeclError(f"{folder}: no config.json (expected a local HF checkpoint folder)")
    scheme = check_quantized_folder(folder)  # names a missing scales/biases key
    if scheme not in (None, "mlx_affine"):
        raise PeftdeclError(
            f"{folder} holds a {scheme} (bitsandbytes) checkpoint; the mlx backend loads float or mlx-lm "
            "quantised folders (use the torch backend)"
        )
    if quantization is not None and scheme is not None:
        raise PeftdeclError(
            f"{folder} is quantised already ({scheme}); it loads as it is, without model.quantization"
        )
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    if device == "cpu":
        mx.set_default_device(mx.cpu)
    try:
        model, config = load_model(folder)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise PeftdeclError(f"{folder}: mlx-lm cannot load this checkpoint ({exc})") from None
    model.set_dtype(DTYPES[dtype])
    if quantization is not None:
        quantize_like_mlx_lm(model, config, quantization)
    mx.eval(model.parameters())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PeftdeclError(f"{folder}: cannot load its tokenizer ({exc})") from None
    return model, cast(Tokenizer, tokenizer)


def quantize_like_mlx_lm(
    model: nn.Module, config: dict[str, object], quantization: QuantizationConfig
) -> None:
    """Replace ``model``'s layers by ``nn.QuantizedLinear`` / ``QuantizedEmbedding`` (MLX affine, ``bits`` and
    ``group_size``; mlx-lm's defaults 4 and 64) through mlx-lm's own ``quantize_model``, so that the layers
    chosen (those whose input size the group size divides, and the model's own predicate) are mlx-lm's."""
    from mlx_lm.utils import quantize_model

    if any(getattr(quantization, name) not in (None, False) for name in TORCH_QUANTIZATION):
        raise PeftdeclError(
            "model.quantization: bitsandbytes settings are the torch backend's; mlx takes bits"
        )
    # quantize_model prints the bits per weight; the CLI owns the terminal
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_model(model, dict(config), quantization.group_size, quantization.bits)


def generate(
    model: AdaptedModel, prompt_ids: Sequence[int], max_new_tokens: int, eos: int | None
) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (new tokens only, ``eos`` included when reached) with a KV cache:
    the prompt in one call, then one token per call. Prefix tuning starts from the engine's prefilled cache;
    prompt tuning puts its virtual tokens into the cache on the first call. Eval mode while generating."""
    from mlx_lm.models.cache import make_prompt_cache

    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise PeftdeclError("generate: the prompt has no tokens")
    engine = cast(MlxEngine, model.engine)
    prefix = any(model.plan(n).kind == "prefix_tuning" for n in model.active_adapters)
    was_training = bool(engine.model.training)
    model.eval()
    try:
        cache = engine.prompt_cache(1) if prefix else make_prompt_cache(engine.model)
        logits = model(mx.array([ids]), cache=cache)
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(np.asarray(mx.argmax(logits[0, -1])))
            new.append(token)
            if token == eos:
                break
            logits = model(mx.array([[token]]), cache=cache)
        return new
    finally:
        model.train(was_training)


def save_merged(
    model: AdaptedModel,
    tokenizer: Tokenizer,
    source: Path,
    out: Path,
    dtype: str | None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dequantize: bool = False,
) -> None:
    """Merge the active adapters into the base (``model`` is used up: merge_and_unload) and write ``out``:
    safetensors shards under the HF names (with ``model.safetensors.index.json`` when there are several),
    ``source``'s config.json with the written dtype, and ``source``'s tokenizer files. ``out`` appears complete
    or not at all; an existing non-empty ``out`` is refused.

    Quantised layers (``nn.QuantizedLinear`` / ``QuantizedEmbedding``) are written re-quantised with their own bits
    and group size and config.json gets mlx-lm's ``quantization`` entry, as ``mlx_lm.fuse`` does; ``dequantize``
    writes them as float weights (merged in full precision) and drops the quantisation entries, as
    ``mlx_lm.fuse --dequantize`` does."""
    source, out = Path(source), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise PeftdeclError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    refuse_prompt_adapters(model)
    check_new_folder(out)  # before the merge consumes the model
    config = json.loads((source / "config.json").read_text())
    merged = cast(nn.Module, model.merge_and_unload(dequantize=dequantize))
    quantization = _quantization_entry(merged)
    if quantization is None:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif "quantization" not in config:  # quantised in memory (QLoRA from a float folder): say how
        config["quantization"] = config["quantization_config"] = quantization
    weights = dict(flatten(merged.parameters()))
    if dtype is not None:
        weights = {k: v.astype(DTYPES[dtype]) if _floating(v) else v for k, v in weights.items()}
    mx.eval(list(weights.values()))
    _check_names(weights, source)
    written = next((str(v.dtype).removeprefix("mlx.core.") for v in weights.values() if _floating(v)), None)
    if written is not None:
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = written
    with new_folder(out) as stage:
        _write_shards(stage, weights, max_shard_bytes)
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = carried_files(source)
        for path in copied:
            shutil.copy2(path, stage / path.name)
        if not any(p.name.startswith("tokenizer") for p in copied):
            tokenizer.save_pretrained(str(stage))  # type: ignore[attr-defined]


def _quantization_entry(model: nn.Module) -> dict[str, object] | None:
    """mlx-lm's config.json ``quantization`` for ``model`` (its first quantised layer's group size, bits and mode;
    mlx-lm's loader reads each layer's own from its arrays), None when no layer is quantised."""
    from peftdecl_mlx.inventory import walk
    from peftdecl_mlx.quantized import is_quantized, mode

    for _, module in walk(model):
        if is_quantized(module):
            return {"group_size": module.group_size, "bits": module.bits, "mode": mode(module)}
    return None


def _floating(value: mx.array) -> bool:
    return bool(mx.issubdtype(value.dtype, mx.floating))


def _write_shards(folder: Path, weights: dict[str, mx.array], max_bytes: int) -> None:
    shards: list[dict[str, mx.array]] = []
    size = 0
    for key, value in weights.items():
        if not shards or size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), shards[0], metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _source_shapes(source: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of every safetensors file of a checkpoint folder (headers only)."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(source.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES:
                raise PeftdeclError(f"{path}: a safetensors header of {length} bytes; is the file corrupt?")
            header = json.loads(handle.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _check_names(weights: dict[str, mx.array], source: Path) -> None:
    """Every merged array must carry a name and shape of the source checkpoint (mlx-lm renames or reshapes some
    architectures' weights; such a folder would not load in transformers). A layer quantised on one side only
    (written re-quantised from a float source, or dequantised from a quantised one) is checked by name: its
    ``scales``/``biases`` are its codes' and its packed weight has another shape."""
    known = _source_shapes(source)
    if not known:
        return  # a source without safetensors (e.g. .bin only): nothing to compare against
    quantized = {k.removesuffix(".scales") for k in (*known, *weights) if k.endswith(".scales")}

    def codes(key: str) -> bool:
        layer, _, leaf = key.rpartition(".")
        return layer in quantized and leaf in ("scales", "biases")

    def packed(key: str) -> bool:
        return key.rpartition(".")[0] in quantized

    foreign = sorted(k for k in weights if k not in known and not codes(k))
    reshaped = sorted(
        k for k in weights if k in known and not packed(k) and list(weights[k].shape) != known[k]
    )
    if foreign or reshaped:
        raise PeftdeclError(
            f"mlx-lm holds this architecture's weights under other names or shapes than {source} "
            f"(e.g. {(foreign or reshaped)[:3]}); the merged model cannot be written as an HF checkpoint"
        )
