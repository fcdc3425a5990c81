"""What peftdecl sees of an MLX model: its adaptable layers (``nn.Linear`` -> linear [out, in], ``nn.Embedding`` ->
embedding [num_embeddings, dim]), its module names in definition order, and the facts in an mlx-lm ``ModelArgs``.

Also loads a local HF checkpoint folder with mlx-lm and describes an MLX model to the NumPy reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeAlias, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from peftdecl.backend import check_options as check_backend_options
from peftdecl.errors import BackendError
from peftdecl.plan import LayerInfo, ModelInfo
from peftdecl.plan.facts import config_facts
from peftdecl.quant.scheme import QuantScheme

KNOWN_OPTIONS = ("adapter_dtype",)
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
TreeNode: TypeAlias = "mx.array | dict[str, TreeNode] | list[TreeNode]"
"""A node of an MLX parameter tree (``nn.Module.parameters()``): an array, or dicts and lists of nodes."""
ParameterTree: TypeAlias = "dict[str, TreeNode]"


def check_options(options: Mapping[str, object]) -> None:
    """Reject options the MLX backend does not understand (the NumPy backend's ``layer_types`` included)."""
    check_backend_options("mlx", options, KNOWN_OPTIONS, "the mlx model itself")


def flatten(tree: ParameterTree | list[TreeNode]) -> list[tuple[str, mx.array]]:
    """``mlx.utils.tree_flatten`` as a list of (dotted path, array)."""
    from mlx.utils import tree_flatten

    flat = tree_flatten(tree)
    assert isinstance(flat, list)  # no destination dict given
    return flat


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every sub-module in definition order, named as ``nn.Module.named_modules`` names them."""
    for key, value in module.items():
        yield from _walk_value(f"{prefix}{key}", value)


def _walk_value(name: str, value: object) -> Iterator[tuple[str, nn.Module]]:
    if isinstance(value, nn.Module):
        yield name, value
        yield from walk(value, name + ".")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_value(f"{name}.{key}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_value(f"{name}.{index}", item)


def get_module(root: nn.Module, name: str) -> nn.Module:
    """The sub-module at a dotted path (list entries by index)."""
    return cast(nn.Module, _node(root, name))


def _node(root: nn.Module, name: str) -> nn.Module | list[nn.Module]:
    # a path may end at a list of modules (``model.layers``): set_module's parent
    node: nn.Module | list[nn.Module] = root
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the sub-module at a dotted path in place."""
    parent_name, _, leaf = name.rpartition(".")
    parent = _node(root, parent_name) if parent_name else root
    if isinstance(parent, list):
        parent[int(leaf)] = new
    else:
        parent[leaf] = new


def dtype_name(dtype: mx.Dtype) -> str:
    """An MLX dtype's name (``float32``, ``bfloat16``)."""
    return str(dtype).rsplit(".", 1)[-1]


def layer_info(module: nn.Module) -> LayerInfo | None:
    """The LayerInfo of an adaptable MLX module: a quantised one with its unpacked sizes, the dtype of its scales
    (the dtype it computes in) and ``quantization="mlx_<mode>"``: ``mlx_affine`` (with its QuantScheme) runs, the
    floating-point modes have no scheme and are refused at attach."""
    if isinstance(module, QUANTIZED):
        rows, packed = module.weight.shape
        unpacked = packed * 32 // module.bits
        mode = f"mlx_{getattr(module, 'mode', 'affine')}"
        scheme = (
            QuantScheme("affine", bits=module.bits, group_size=module.group_size)
            if mode == "mlx_affine"
            else None
        )
        dtype = dtype_name(module.scales.dtype)
        if isinstance(module, nn.QuantizedLinear):
            return LayerInfo(
                "linear",
                unpacked,
                rows,
                "bias" in module,
                dtype=dtype,
                quantization=mode,
                quant_scheme=scheme,
            )
        return LayerInfo(
            "embedding", rows, unpacked, False, dtype=dtype, quantization=mode, quant_scheme=scheme
        )
    if isinstance(module, nn.Linear):
        out, d_in = module.weight.shape
        return LayerInfo("linear", d_in, out, "bias" in module, dtype=dtype_name(module.weight.dtype))
    if isinstance(module, nn.Embedding):
        num, dim = module.weight.shape
        return LayerInfo("embedding", num, dim, False, dtype=dtype_name(module.weight.dtype))
    return None


def inventory(model: nn.Module) -> ModelInfo:
    """Every adaptable layer and module name of ``model`` plus the facts of its mlx-lm ``args``."""
    from peftdecl_mlx.layer import AdaptedLayer, SavedModule

    layers: dict[str, LayerInfo] = {}
    modules = []
    for name, sub in walk(model):
        if isinstance(sub, (AdaptedLayer, SavedModule)):
            raise BackendError(
                f"{name} already carries peftdecl adapters; add more with AdaptedModel.add_adapter, "
                "or pass the model returned by merge_and_unload()"
            )
        modules.append(name)
        info = layer_info(sub)
        if info is not None:
            layers[name] = info
    return ModelInfo(layers=layers, modules=tuple(modules), **model_facts(model, layers))


def model_facts(model: nn.Module, layers: Mapping[str, LayerInfo]) -> dict[str, Any]:
    """The ModelInfo fields an mlx-lm model's ``args`` and module names provide (empty for a plain module)."""
    facts: dict[str, str | int | None] = {}
    embeddings = [n for n, info in layers.items() if info.type == "embedding"]
    named = [n for n in embeddings if n.rsplit(".", 1)[-1] in ("embed_tokens", "wte", "word_embeddings")]
    if named or embeddings:
        facts["word_embeddings"] = (named or embeddings)[0]
    if "lm_head" in layers and layers["lm_head"].type == "linear":
        facts["output_head"] = "lm_head"
    args = getattr(model, "args", None)
    if args is None:
        return facts
    text = getattr(args, "text_config", None) or args
    if isinstance(text, dict):
        text = type("TextArgs", (), text)
    facts.update(config_facts(args, text))
    return facts


def load_checkpoint(directory: str | Path) -> nn.Module:
    """An mlx-lm model from a local HF checkpoint folder (config.json + model*.safetensors); no tokenizer needed."""
    from mlx_lm.utils import load_model

    folder = Path(directory)
    if not (folder / "config.json").is_file():
        raise BackendError(f"{folder}: no config.json (expected a local HF checkpoint folder)")
    model, _ = load_model(folder)
    return model


def numpy_model(model: nn.Module) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, object]]:
    """``(state_dict, layer_types, model_facts)`` for ``peftdecl.attach(state_dict, spec, layer_types=..., **facts)``
    on the NumPy reference: the same layers and facts the MLX backend sees, weights as float64."""
    info = inventory(model)
    params = flatten(model.parameters())
    mx.eval([v for _, v in params])
    state = {k: np.array(v.astype(mx.float32), dtype=np.float64) for k, v in params}
    layer_types: dict[str, str] = {name: li.type for name, li in info.layers.items() if li.type != "linear"}
    facts: dict[str, object] = {
        f: getattr(info, f)
        for f in (
            "output_head",
            "model_type",
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "word_embeddings",
        )
    }
    return state, layer_types, facts
