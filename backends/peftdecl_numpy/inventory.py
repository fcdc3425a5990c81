"""The layers of a state dict (name -> array) as the IR describes them, dtype and quantisation included.

A module ``m`` owns ``m.weight`` (and ``m.bias``). A quantised module is recognised by the tensors its library
saves next to the packed weight: MLX's affine quantisation (uint32 ``weight`` with ``scales`` and ``biases``) and
bitsandbytes (int8/uint8 ``weight`` with ``SCB`` for 8 bits, ``weight.absmax`` / ``weight.quant_state.*`` for 4).
Its quantisation state is read (:mod:`peftdecl.quant.layouts`) for the scheme and the dequantised shape, so a
malformed checkpoint is refused here, naming the key. MLX's bits and group size are not in the tensors: they come
as the model fact ``quantization`` (mlx-lm's config.json entry, ``{"bits": 4, "group_size": 64}`` with optional
per-module overrides); it may also carry bitsandbytes' ``llm_int8_threshold``. A plain integer weight without
such tensors is read as the numbers it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, SupportsFloat, SupportsInt, cast

import numpy as np
import numpy.typing as npt

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerInfo, ModelInfo
from peftdecl.plan.ir import LayerType
from peftdecl.quant.layouts import QUANTIZATIONS, quantized_from_tensors
from peftdecl.quant.scheme import Quantized
from peftdecl_numpy.mha import is_mha_declaration, mha_layer_info
from peftdecl_numpy.parameters import parameter_infos

ENGINE_OPTIONS = ("xp", "dtype")
"""``attach`` / ``load_adapter`` options the engine reads (not model facts)."""
LayerDeclaration = str | Mapping[str, object] | LayerInfo
"""A ``layer_types`` entry: a layer type name, a mapping of ``type`` and convolution settings, or a LayerInfo."""
_NDIM = {"linear": 2, "embedding": 2, "gpt2_conv1d": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5}


def inventory(
    state_dict: Mapping[str, npt.ArrayLike],
    layer_types: Mapping[str, LayerDeclaration] | None = None,
    **model_facts: Any,
) -> ModelInfo:
    """Layers of a state dict: every ``m.weight`` of 2+ dims (2-D: linear unless ``layer_types`` says otherwise).

    ``layer_types`` maps a module to ``"linear" | "embedding" | "conv1d" | "conv2d" | "conv3d" | "gpt2_conv1d"`` or a
    dict / LayerInfo giving convolution settings (``stride``, ``padding``, ``dilation``, ``groups``); every float
    tensor is also a raw parameter ``target_parameters`` may name (``{"experts.gate_up_proj": {"type": "parameter",
    "transposed": True}}`` declares an ``[E, in, out]`` expert stack).
    ``quantization`` (a model fact): how MLX-quantised weights are laid out (see the module docstring).
    """
    layer_types = dict(layer_types or {})
    for option in ENGINE_OPTIONS:
        model_facts.pop(option, None)
    settings = _quantization_settings(model_facts.pop("quantization", None))
    parameters = parameter_infos(state_dict, layer_types)  # target_parameters' candidates
    layers: dict[str, LayerInfo] = {}
    modules = []
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module and module not in modules:
            modules.append(module)
        if leaf != "weight":
            continue
        array = np.asarray(value)
        declared = layer_types.pop(module, None)
        if declared is None and array.ndim != 2:
            continue
        has_bias = f"{module}.bias" in state_dict
        found = quantization(state_dict, module, array.dtype)
        if isinstance(declared, LayerInfo):
            found = declared.quantization or found
        if found is None or found not in QUANTIZATIONS:  # a float layer, or one we cannot read
            info = _layer_info(key, array.shape, declared, has_bias)
            layers[module] = dataclasses.replace(
                info, dtype=info.dtype or array.dtype.name, quantization=found
            )
            continue
        q = read_quantized(state_dict, module, found, settings)
        info = _layer_info(key, q.shape, declared, has_bias)
        layers[module] = dataclasses.replace(
            info, dtype=info.dtype or array.dtype.name, quantization=found, quant_scheme=q.scheme
        )
    for module in [m for m, declared in layer_types.items() if is_mha_declaration(declared)]:
        layers[module] = mha_layer_info(state_dict, module, layer_types.pop(module))
    if layer_types:
        raise PeftdeclError(
            f"layer_types names modules without a weight in the state dict: {sorted(layer_types)}"
        )
    return ModelInfo(layers=layers, parameters=parameters, modules=tuple(modules), **model_facts)


def quantization(state_dict: Mapping[str, npt.ArrayLike], module: str, dtype: np.dtype) -> str | None:
    """How ``module``'s weight is quantised (``LayerInfo.quantization``), from the tensors saved beside it."""
    own = [key[len(module) + 1 :] for key in state_dict if key.startswith(module + ".")]
    if "scales" in own and dtype == np.uint32:
        return "mlx_affine"
    if "SCB" in own or "weight_format" in own:
        return "bnb_8bit"
    if any(k.startswith(("weight.absmax", "weight.quant_state", "weight.quant_map")) for k in own):
        return "bnb_4bit"
    return None


def read_quantized(
    state_dict: Mapping[str, npt.ArrayLike], module: str, found: str, settings: Mapping[str, object]
) -> Quantized:
    """``module``'s quantised weight, read with the model's ``quantization`` settings (per-module entries win)."""
    own = settings.get(module)
    merged = {**settings, **own} if isinstance(own, Mapping) else dict(settings)
    bits, group_size = merged.get("bits"), merged.get("group_size")
    if found == "mlx_affine":
        if merged.get("mode", "affine") != "affine":
            raise PeftdeclError(f"{module}: quantisation mode {merged['mode']!r} is not MLX's affine mode")
        if bits is None or group_size is None:
            raise PeftdeclError(
                f"{module}.weight: an MLX affine-quantised weight; pass the model fact quantization={{'bits': .., "
                "'group_size': ..} (the 'quantization' entry of the mlx-lm model's config.json) to read it"
            )
    threshold = merged.get("llm_int8_threshold", 0.0)
    return quantized_from_tensors(
        state_dict,
        module,
        found,
        bits=None if bits is None else _int(bits),
        group_size=None if group_size is None else _int(group_size),
        threshold=float(cast("SupportsFloat", threshold)),
    )


def _quantization_settings(value: object) -> Mapping[str, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PeftdeclError(
            f"quantization: expected a mapping like {{'bits': 4, 'group_size': 64}}, got {type(value).__name__}"
        )
    return value


def _layer_info(
    key: str, shape: tuple[int, ...], declared: LayerDeclaration | None, has_bias: bool
) -> LayerInfo:
    if isinstance(declared, LayerInfo):
        return declared
    settings: dict[str, object] = (
        dict(declared) if isinstance(declared, Mapping) else {"type": declared or "linear"}
    )
    kind = cast(LayerType, settings.pop("type"))
    if kind not in _NDIM:
        raise PeftdeclError(
            f"layer_types[{key[:-7]!r}]: unknown layer type {kind!r}; expected one of {list(_NDIM)}"
        )
    if len(shape) != _NDIM[kind]:
        raise PeftdeclError(f"{key}: a {kind} weight has {_NDIM[kind]} dimensions, got shape {list(shape)}")
    if kind == "gpt2_conv1d":
        return LayerInfo(kind, shape[0], shape[1], has_bias)
    if kind == "linear":
        return LayerInfo(kind, shape[1], shape[0], has_bias)
    if kind == "embedding":
        return LayerInfo(kind, shape[0], shape[1], False)
    dims = len(shape) - 2
    groups = _int(settings.pop("groups", 1))

    def tup(name: str, default: int) -> tuple[int, ...]:
        value = settings.pop(name, default)
        return tuple(value) if isinstance(value, (list, tuple)) else (_int(value),) * dims

    info = LayerInfo(
        kind,
        shape[1] * groups,
        shape[0],
        has_bias,
        kernel_size=tuple(shape[2:]),
        stride=tup("stride", 1),
        padding=tup("padding", 0),
        dilation=tup("dilation", 1),
        groups=groups,
    )
    if settings:
        raise PeftdeclError(f"layer_types[{key[:-7]!r}]: unknown settings {sorted(settings)}")
    return info


def _int(value: object) -> int:
    """A user's setting as an int; what int() refuses raises its own TypeError/ValueError, as it always did."""
    return int(cast("SupportsInt | str", value))
