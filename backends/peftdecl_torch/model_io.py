"""Whole models on torch: load a local transformers checkpoint, greedy generation through the adapters, and the
merged model written as a sharded safetensors checkpoint (atomically: ``out`` appears complete or not at all)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from peftdecl.errors import PeftdeclError
from peftdecl.merged_checkpoint import carried_files, new_folder, refuse_prompt_adapters

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel
    from peftdecl.train.config import QuantizationConfig
    from peftdecl.train.runtime import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_SIZE = "5GB"
"""Largest safetensors shard of a merged checkpoint (transformers' size string or bytes)."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``float32``, ``bfloat16`` or ``float16``."""
    if name not in DTYPES:
        raise PeftdeclError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (which must be available) or ``auto`` (cuda when available, else cpu)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PeftdeclError("device 'cuda' was asked for, but torch sees no CUDA device (use cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise PeftdeclError(f"device {device!r} is not one of cpu, cuda, auto")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: one GPU per process
    return torch.device(device)


def _quiet_transformers() -> None:
    """No progress bars or info chatter from transformers (the CLI owns the terminal)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_pretrained(
    directory: Path, *, device: str, dtype: str, quantization: QuantizationConfig | None = None
) -> tuple[nn.Module, Tokenizer]:
    """The causal LM and tokenizer (a transformers ``PreTrainedTokenizerBase``) of a local HF checkpoint folder
    (never the network), on ``device`` in ``dtype``, in eval mode (a quantised one frozen).

    ``quantization`` (bitsandbytes names) loads the linear layers as ``Linear4bit`` / ``Linear8bitLt`` through
    transformers' ``BitsAndBytesConfig``, as ``from_pretrained(quantization_config=...)`` does; a folder saved
    quantised (its config.json's ``quantization_config``) loads quantised without it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PeftdeclError(f"model folder {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise PeftdeclError(f"model folder {directory} has no config.json (expected a HF checkpoint folder)")
    target = resolve_device(device)
    wanted = torch_dtype(dtype)
    layout = _saved_quantization(directory)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict[str, object] = {"dtype": wanted, "local_files_only": True}
    if quantization is not None:
        if layout is not None:
            raise PeftdeclError(
                f"model folder {directory} is quantised already ({layout}); it loads as it is, "
                "without model.quantization"
            )
        options["quantization_config"] = bnb_config(quantization)
    quantized = quantization is not None or layout is not None
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        raise PeftdeclError(
            f"model folder {directory}: a {layout or 'quantised'} base needs bitsandbytes, which is not "
            "installed: pip install 'peftdecl[qlora]'"
        )
    if quantized:  # bitsandbytes places its layers while loading; a quantised model refuses .to() afterwards
        options["device_map"] = {"": str(target)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **options)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise PeftdeclError(f"model folder {directory}: transformers cannot load it: {exc}") from exc
    if not quantized:
        model.to(target)  # type: ignore[arg-type]  # transformers' stub of .to is narrower than nn.Module's
    else:  # only the adapter trains over a quantised base (its integer weights cannot take gradients)
        model.requires_grad_(False)
        if target.type == "cpu":
            keep_4bit_layout(cast(nn.Module, model))
            own_float_memory(cast(nn.Module, model))
    model.eval()
    return cast(nn.Module, model), cast("Tokenizer", tokenizer)


def own_float_memory(model: nn.Module) -> None:
    """Copy the float parameters and buffers of a model loaded quantised on the CPU out of the checkpoint's
    memory map. transformers leaves them as views of it, so the float embeddings and head keep the whole mapping
    alive, and with it every page quantising read: the full-precision weights the model no longer holds stay in
    the resident set (at 0.5 B parameters, 2.5 GiB resident instead of 1 GiB). Quantised weights own theirs."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor) in (nn.Parameter, torch.Tensor):
                tensor.data = tensor.data.clone()


def bnb_config(quantization: QuantizationConfig) -> object:
    """transformers' ``BitsAndBytesConfig`` of the training file's ``model.quantization`` (same names; a field
    left out keeps transformers' default)."""
    from transformers import BitsAndBytesConfig

    options: dict[str, object] = {
        "load_in_4bit": quantization.load_in_4bit,
        "load_in_8bit": quantization.load_in_8bit,
    }
    if quantization.bnb_4bit_quant_type is not None:
        options["bnb_4bit_quant_type"] = quantization.bnb_4bit_quant_type
    if quantization.bnb_4bit_use_double_quant is not None:
        options["bnb_4bit_use_double_quant"] = quantization.bnb_4bit_use_double_quant
    if quantization.bnb_4bit_compute_dtype is not None:
        options["bnb_4bit_compute_dtype"] = torch_dtype(quantization.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(**options)


def keep_4bit_layout(model: nn.Module) -> None:
    """Switch off bitsandbytes' CPU repacking of 4-bit weights. On CPUs with AVX512-BF16 its first eval-mode
    forward rewrites each ``Linear4bit`` weight in place (another layout, block scales rounded to bfloat16); the
    weight then no longer equals the checkpoint or the model PEFT loads, and merging or saving reads it wrong."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _saved_quantization(directory: Path) -> str | None:
    """The folder's own quantisation (``bnb_4bit``, ``bnb_8bit``) or None, after checking that every quantised
    weight carries its state (a missing key is named); an mlx-lm folder is refused, as transformers cannot read
    its packed weights."""
    from peftdecl.quant.folder import check_quantized_folder

    scheme = check_quantized_folder(directory)
    if scheme == "mlx_affine":
        raise PeftdeclError(
            f"model folder {directory} is quantised by mlx-lm (config.json 'quantization'); "
            "the torch backend loads float or bitsandbytes checkpoints (use the mlx backend)"
        )
    return scheme


def model_device(model: AdaptedModel) -> torch.device:
    """Where the adapted model's base weights live (inputs go there)."""
    base = cast(nn.Module, model.base_model)
    first = next(base.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def generate(
    model: AdaptedModel, prompt_ids: Sequence[int], max_new_tokens: int, eos: int | None
) -> list[int]:
    """Greedy continuation of one prompt through the active adapters (prompt and prefix tuning included): the
    new tokens only, ending with ``eos`` when it was produced. The model's train/eval mode is restored after."""
    if not prompt_ids:
        raise PeftdeclError("generate needs a prompt of at least one token")
    base = cast(nn.Module, model.base_model)
    was_training = base.training
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model_device(model))
    extra: dict[str, object] = {} if eos is None else {"eos_token_id": eos, "pad_token_id": eos}
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                **extra,
            )
    finally:
        model.train(was_training)
    sequence = cast(torch.Tensor, out)[0].tolist()
    # decoder-only generate returns the prompt followed by the new tokens
    new = sequence[len(prompt_ids) :] if sequence[: len(prompt_ids)] == list(prompt_ids) else sequence
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
    return [int(t) for t in new]


def save_merged(
    model: AdaptedModel,
    tokenizer: Tokenizer,
    source: Path,
    out: Path,
    dtype: str | None,
    *,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    dequantize: bool = False,
) -> None:
    """Merge the active adapters into the base (the adapted model is consumed), cast to ``dtype`` and write a
    transformers checkpoint (sharded safetensors, an index when several shards) with ``source``'s tokenizer files
    into ``out``, which must be absent or empty; nothing is left behind on failure. A bitsandbytes base is saved
    re-quantised (transformers' 4-/8-bit layout), or with ``dequantize`` as a float checkpoint."""
    out, source = Path(out), Path(source)
    refuse_prompt_adapters(model)
    wanted = torch_dtype(dtype) if dtype is not None else None
    with new_folder(out) as staging:
        merged = cast(nn.Module, model.merge_and_unload(dequantize=dequantize))
        if dequantize:
            _forget_quantization(merged)
        _drop_irreversible_conversions(merged)
        if wanted is not None:
            merged.to(wanted)
        save = getattr(merged, "save_pretrained", None)
        if save is None:
            raise PeftdeclError(
                f"{type(merged).__name__} has no save_pretrained(); it is not a transformers model"
            )
        options: dict[str, object] = {"max_shard_size": max_shard_size}
        if (
            "safe_serialization" in inspect.signature(save).parameters
        ):  # transformers 4 (5: always safetensors)
            options["safe_serialization"] = True
        save(str(staging), **options)
        save_tokenizer = getattr(tokenizer, "save_pretrained", None)
        if save_tokenizer is not None:
            save_tokenizer(str(staging))
        for path in carried_files(source):
            if not (staging / path.name).exists():
                shutil.copy2(path, staging / path.name)


def _forget_quantization(model: nn.Module) -> None:
    """After its bitsandbytes layers became float ones: transformers must save (and later load) ``model`` as a
    float checkpoint, so its record of the quantisation goes."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)


def _drop_irreversible_conversions(model: nn.Module) -> None:
    """Forget load-time weight conversions that transformers cannot undo when saving.

    transformers 5 records the bitsandbytes deserialisation of a checkpoint saved already quantised as such a
    conversion, and its ``save_pretrained`` then raises NotImplementedError. The layers hold the saved layout
    already (``weight``, ``absmax``, ``quant_state``), so there is nothing to undo."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        return
    kept = []
    for conversion in conversions:
        try:
            conversion.reverse_transform()
        except NotImplementedError:
            continue
        kept.append(conversion)
    setattr(model, "_weight_conversions", kept or None)  # noqa: B010 (nn.Module types its attributes as tensors)
