"""What peftdecl sees of a torch model: its adaptable layers (as LayerInfo), its module names and config facts.

Also describes a torch model to the NumPy reference (``numpy_model``): its state dict as float64 arrays, the
layer types and the same model facts, so both backends compile the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict, cast

import numpy as np
import torch
from torch import nn

from peftdecl.backend import check_options as check_backend_options
from peftdecl.errors import BackendError
from peftdecl.plan import LayerInfo, ModelInfo
from peftdecl.plan.facts import config_facts
from peftdecl.plan.ir import LayerType
from peftdecl.plan.targeting import SEQ_CLS_HEAD_NAMES
from peftdecl.quant.scheme import QuantScheme
from peftdecl_torch.mha import is_adaptable_mha, mha_layer_info

KNOWN_OPTIONS = ("autocast_adapter_dtype",)


class ModelFacts(TypedDict, total=False):
    """The :class:`peftdecl.plan.ModelInfo` fields a model provides besides its layers (a field it does not
    provide is absent and keeps ModelInfo's default)."""

    model_class: tuple[str, str]
    output_head: str | None
    word_embeddings: str | None
    classifier_head: str | None
    model_type: str | None
    num_layers: int | None
    hidden_size: int | None
    num_attention_heads: int | None
    num_key_value_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    is_encoder_decoder: bool
    name_or_path: str | None


LayerTypeEntry = str | dict[str, str | int | list[int]]
"""A ``layer_types`` entry of the NumPy reference: the IR layer type, or a conv layer's type and settings."""


def check_options(options: Mapping[str, object]) -> None:
    """Reject options the torch backend does not understand (the NumPy backend's ``layer_types`` included)."""
    check_backend_options("torch", options, KNOWN_OPTIONS, "the nn.Module itself")


QUANTIZED_LINEAR = {"Linear4bit": "bnb_4bit", "Linear8bitLt": "bnb_8bit"}
"""Quantised linear layers by class name (bitsandbytes'), recognised without importing their library."""


def quantization(module: nn.Module) -> str | None:
    """How ``module``'s weight is quantised (``LayerInfo.quantization``): ``bnb_4bit``/``bnb_8bit`` for
    bitsandbytes' layers, ``unknown`` for any other weight that is not floating point, None for a float weight."""
    for cls in type(module).__mro__:
        if cls.__name__ in QUANTIZED_LINEAR:
            return QUANTIZED_LINEAR[cls.__name__]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
        return "unknown"
    return None


def quant_scheme(module: nn.Module) -> QuantScheme | None:
    """The scheme of a bitsandbytes layer's weight, read from its quantisation state (None for other layers, and
    for a 4-bit layer not yet quantised, which has no state)."""
    name = quantization(module)
    if name == "bnb_8bit":
        state = getattr(module, "state", None)
        return QuantScheme("int8", threshold=float(getattr(state, "threshold", 0.0) or 0.0))
    if name != "bnb_4bit":
        return None
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return None
    nested = getattr(state, "state2", None)
    return QuantScheme(
        state.quant_type,
        block_size=int(state.blocksize),
        double_quant=bool(getattr(state, "nested", False)),
        nested_block_size=int(nested.blocksize) if nested is not None else 256,
    )


def _dtype_name(module: nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    return str(weight.dtype).removeprefix("torch.") if isinstance(weight, torch.Tensor) else None


def layer_type(module: nn.Module) -> LayerType | None:
    """The IR layer type of a torch module, or None when peftdecl cannot adapt it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if any(cls.__name__ in QUANTIZED_LINEAR for cls in type(module).__mro__) and hasattr(
        module, "in_features"
    ):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_adaptable_mha(module):
        return "mha"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    # transformers' GPT-2 Conv1D: a linear layer whose weight is stored [in, out]
    if (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    ):
        return "gpt2_conv1d"
    return None


def layer_info(module: nn.Module) -> LayerInfo | None:
    """The LayerInfo of an adaptable torch module (None otherwise), with its weight's dtype and quantisation."""
    kind = layer_type(module)
    if kind is None:
        return None
    if kind == "mha":
        return mha_layer_info(cast(nn.MultiheadAttention, module))
    has_bias = getattr(module, "bias", None) is not None
    dtype, quantized, scheme = _dtype_name(module), quantization(module), quant_scheme(module)
    if kind == "linear":
        linear = cast(nn.Linear, module)  # or a quantised linear layer, which has the same attributes
        return LayerInfo(
            kind,
            linear.in_features,
            linear.out_features,
            has_bias,
            dtype=dtype,
            quantization=quantized,
            quant_scheme=scheme,
        )
    if kind == "gpt2_conv1d":
        d_in, d_out = cast(torch.Tensor, module.weight).shape
        return LayerInfo(
            kind, d_in, d_out, has_bias, dtype=dtype, quantization=quantized, quant_scheme=scheme
        )
    if kind == "embedding":
        embedding = cast(nn.Embedding, module)
        return LayerInfo(
            kind,
            embedding.num_embeddings,
            embedding.embedding_dim,
            False,
            dtype=dtype,
            quantization=quantized,
            quant_scheme=scheme,
        )
    conv = cast("nn.Conv1d | nn.Conv2d | nn.Conv3d", module)
    if isinstance(conv.padding, str):
        raise BackendError(
            f"{type(module).__name__} with padding={conv.padding!r} is not supported; use explicit integer padding"
        )
    return LayerInfo(
        kind,
        conv.in_channels,
        conv.out_channels,
        has_bias,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        padding=tuple(conv.padding),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        dtype=dtype,
        quantization=quantized,
        quant_scheme=scheme,
    )


def inventory(model: nn.Module) -> ModelInfo:
    """Every adaptable layer and every module name of ``model`` (in ``named_modules`` order), plus its facts."""
    from peftdecl_torch.layer import AdaptedLayer
    from peftdecl_torch.saved import SavedModule

    layers: dict[str, LayerInfo] = {}
    modules = []
    for name, sub in model.named_modules():
        if isinstance(sub, (AdaptedLayer, SavedModule)):
            raise BackendError(
                f"{name} already carries peftdecl adapters; add more with AdaptedModel.add_adapter, "
                "or pass the model returned by merge_and_unload()"
            )
        if not name:
            continue
        modules.append(name)
        info = layer_info(sub)
        if info is not None:
            layers[name] = info
    from peftdecl_torch.param_wrapper import parameter_infos  # target_parameters' candidates
    from peftdecl_torch.tied import tied_to_embeddings

    return ModelInfo(
        layers=layers,
        modules=tuple(modules),
        parameters=parameter_infos(model),
        tied_to_embeddings=tied_to_embeddings(model),
        **model_facts(model),
    )


def _embedding_name(model: nn.Module, getter: str, names: Mapping[int, str]) -> str | None:
    """The module name of the layer ``model.<getter>()`` returns (None where the model has no such layer)."""
    try:
        found = getattr(model, getter)()
    except NotImplementedError:  # transformers raises this for models without such a layer
        found = None
    return names.get(id(found)) if found is not None else None


def model_facts(model: nn.Module) -> ModelFacts:
    """The ModelInfo fields a transformers model's config and embeddings provide (only ``model_class`` for a plain
    module)."""
    names = {id(sub): name for name, sub in model.named_modules()}
    facts = ModelFacts(model_class=(type(model).__name__, type(model).__module__))
    if hasattr(model, "get_output_embeddings"):
        facts["output_head"] = _embedding_name(model, "get_output_embeddings", names)
    if hasattr(model, "get_input_embeddings"):
        facts["word_embeddings"] = _embedding_name(model, "get_input_embeddings", names)
    config = getattr(model, "config", None)
    if config is not None:
        # HF PEFT's SEQ_CLS head: the first of the model's own attributes "score", "classifier" that is a module
        heads = (getattr(model, attr, None) for attr in SEQ_CLS_HEAD_NAMES)
        head = next((h for h in heads if isinstance(h, nn.Module)), None)
        facts["classifier_head"] = names.get(id(head)) if head is not None else None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        # config_facts returns ModelInfo's model_type and size fields
        facts.update(cast(ModelFacts, config_facts(config, text)))
        facts["is_encoder_decoder"] = bool(getattr(config, "is_encoder_decoder", False))
        facts["name_or_path"] = (
            getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
        )
    return facts


def numpy_model(model: nn.Module) -> tuple[dict[str, np.ndarray], dict[str, LayerTypeEntry], ModelFacts]:
    """``(state_dict, layer_types, model_facts)`` for ``peftdecl.attach(state_dict, spec, layer_types=..., **facts)``
    on the NumPy reference: the same layers and facts the torch backend sees, weights as float64."""
    state = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in model.state_dict().items()}
    layer_types: dict[str, LayerTypeEntry] = {}
    for name, sub in model.named_modules():
        info = layer_info(sub) if name else None
        if info is not None and info.type == "mha":
            layer_types[name] = {"type": "mha", "num_heads": info.num_heads, "batch_first": info.batch_first}
        if name and getattr(sub, "is_transposed", False):  # target_parameters: stacks stored [E, in, out]
            for leaf, _ in sub.named_parameters(recurse=False):
                layer_types[f"{name}.{leaf}"] = {"type": "parameter", "transposed": True}
        if info is None or f"{name}.weight" not in state:
            continue
        if info.is_conv:
            layer_types[name] = {
                "type": info.type,
                "stride": list(info.stride),
                "padding": list(info.padding),
                "dilation": list(info.dilation),
                "groups": info.groups,
            }
        elif info.type != "linear":
            layer_types[name] = info.type
    return state, layer_types, model_facts(model)


def load_checkpoint(directory: str | Path) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on a local folder (no hub access), float32, in eval mode."""
    folder = Path(directory)
    if not (folder / "config.json").is_file():
        raise BackendError(f"{folder}: no config.json (expected a save_pretrained checkpoint folder)")
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    )
    return model.eval()
