"""The IR: frozen, array-free descriptions of what to build. Backends receive these and arrays, nothing else.

Conventions fixed here once: weights are ``[out, in]`` (conv: ``[out, in/groups, *kernel]``); parameter names are
HF PEFT's state-dict suffixes (``lora_A.weight``), so a parameter's full key is ``f"{module}.{name}"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from peftdecl.quant.scheme import QuantScheme
from peftdecl.spec import SpecBase

LayerType = Literal["linear", "embedding", "conv1d", "conv2d", "conv3d", "gpt2_conv1d", "mha", "parameter"]
LAYER_TYPES: tuple[str, ...] = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "gpt2_conv1d", "mha")
CONV_LAYER_TYPES: tuple[str, ...] = ("conv1d", "conv2d", "conv3d")
Role = Literal["trainable", "frozen", "shared"]


@dataclass(frozen=True)
class LayerInfo:
    """One adaptable base layer: its type and shapes. ``in_features``/``out_features`` are channels for
    convolutions and (num_embeddings, embedding_dim) for embeddings."""

    type: LayerType
    in_features: int
    out_features: int
    bias: bool = False
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    dtype: str | None = None
    """The base weight's dtype as the framework names it (``float32``, ``bfloat16``); None where unknown."""
    quantization: str | None = None
    """How the base weight is quantised (``bnb_4bit``, ``bnb_8bit``, ``mlx_affine``, ``unknown``); None: it is
    not. A backend refuses to adapt a layer whose quantisation its Capabilities do not list."""
    quant_scheme: QuantScheme | None = None
    """The full scheme of a quantised weight (NF4/FP4 block size and double quantisation, int8 threshold, MLX bits
    and group size) where the backend can read it; its ``name`` equals ``quantization``."""
    num_heads: int = 0
    """Attention heads of an ``mha`` layer (torch's nn.MultiheadAttention, in = embed_dim, out = 3·embed_dim as
    HF PEFT counts its in_proj; its IR weight is in_proj [3E, E] stacked over out_proj [E, E]); 0 elsewhere."""
    batch_first: bool = False
    """An ``mha`` layer's input layout: [batch, seq, E] when True, torch's default [seq, batch, E] otherwise."""
    parameter: str = ""
    """Type ``parameter`` (a raw ``nn.Parameter`` targeted by ``target_parameters``): its full name."""
    shape: tuple[int, ...] = ()
    """Type ``parameter``: its shape, ``[out, in]`` or ``[experts, out, in]`` (``[experts, in, out]`` if
    ``transposed``); ``in_features``/``out_features`` are then those of one expert."""
    transposed: bool = False
    """Type ``parameter``: the module holding it marks its experts as stored ``[experts, in, out]``."""

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The base weight in the IR's ``[out, in]`` layout (a raw parameter: its own shape)."""
        if self.type == "parameter":
            return self.shape
        if self.type == "embedding":
            return (self.in_features, self.out_features)
        if self.type in CONV_LAYER_TYPES:
            return (self.out_features, self.in_features // self.groups, *self.kernel_size)
        if self.type == "mha":
            return (self.out_features + self.in_features, self.in_features)
        return (self.out_features, self.in_features)

    @property
    def is_conv(self) -> bool:
        return self.type in CONV_LAYER_TYPES

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size) if self.kernel_size else 1


@dataclass(frozen=True)
class ModelInfo:
    """The framework-free inventory a plan is compiled against."""

    layers: Mapping[str, LayerInfo]
    """Every adaptable layer, by full module name, in model order."""
    parameters: Mapping[str, LayerInfo] = field(default_factory=dict)
    """Every parameter ``target_parameters`` may name (type ``parameter``), by full name, in model order."""
    modules: tuple[str, ...] = ()
    """Every module name (for modules_to_save and error hints); defaults to the layer names."""
    output_head: str | None = None
    """The output projection excluded by ``all-linear`` (e.g. ``lm_head``)."""
    classifier_head: str | None = None
    """A sequence-classification head (the model's own ``score`` or ``classifier`` child, as HF PEFT looks it up):
    ``all-linear`` excludes it for ``task_type`` SEQ_CLS when there is no ``output_head``."""
    model_type: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    is_encoder_decoder: bool = False
    word_embeddings: str | None = None
    """Module holding the input token embeddings (prompt tuning's SAMPLE_VOCAB and TEXT initialisation)."""
    model_class: tuple[str, str] | None = None
    """(class name, Python module) of the base model, recorded as HF PEFT's ``auto_mapping``."""
    name_or_path: str | None = None
    """The base model's hub id or local folder (transformers' ``name_or_path``), saved as HF PEFT's
    ``base_model_name_or_path`` where the spec leaves it null."""
    tied_to_embeddings: tuple[str, ...] = ()
    """Modules whose weight is the input embeddings' own (``tie_word_embeddings``, e.g. ``lm_head``): trainable
    tokens on the embeddings reach them too, as in HF PEFT."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        if not self.modules:
            object.__setattr__(self, "modules", tuple(self.layers))


InitArg = str | int | float | tuple[int, ...]
"""An argument of an initialisation rule: a number, a source name or token ids."""


@dataclass(frozen=True)
class Init:
    """A deterministic initialisation rule, e.g. ``Init("kaiming_uniform", fan_in=64)``."""

    rule: Literal[
        "zeros", "ones", "constant", "normal", "uniform", "kaiming_uniform", "torch_cpu_uniform", "external"
    ]
    args: tuple[tuple[str, InitArg], ...] = ()

    def __init__(self, rule: str, **args: InitArg) -> None:
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "args", tuple(sorted(args.items())))

    def arg(self, name: str, default: InitArg | None = None) -> Any:
        # untyped on purpose: each rule knows its arguments and converts them (float(...), int(...)) where read
        return dict(self.args).get(name, default)


@dataclass(frozen=True)
class ParamSpec:
    """One adapter tensor: HF PEFT's key suffix, its shape, its role and its initialisation."""

    name: str
    shape: tuple[int, ...]
    role: Role
    init: Init

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LayerPlan:
    """What to build on one base layer."""

    module: str
    layer: LayerInfo
    kind: str
    """Execution kind: lora, dora, adalora, ia3, loha, lokr, oft, boft, vera."""
    params: tuple[ParamSpec, ...]
    r: int = 0
    alpha: float = 0.0
    scaling: float = 1.0
    options: Mapping[str, Any] = field(default_factory=dict)
    """Kind-specific settings (dropout rates, fan_in_fan_out, block sizes, ...), read-only."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.module} has no adapter parameter {name!r}")

    def key(self, name: str) -> str:
        """The full key of one of this layer's parameters."""
        return f"{self.module}.{name}"


@dataclass(frozen=True)
class PromptPlan:
    """Virtual tokens of prefix or prompt tuning; the table itself is a shared parameter."""

    kind: Literal["prefix_tuning", "prompt_tuning"]
    num_virtual_tokens: int
    token_dim: int
    num_layers: int
    num_attention_heads: int
    num_transformer_submodules: int
    projection_hidden: int | None = None
    """Hidden size of prefix tuning's projection MLP while training (None: no projection)."""


@dataclass(frozen=True)
class Plan:
    """A compiled adapter: the spec it came from, the layers it touches and its shared tensors."""

    spec: SpecBase
    kind: str
    layers: tuple[LayerPlan, ...]
    shared: tuple[ParamSpec, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    prompt: PromptPlan | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(layer.module for layer in self.layers)

    def layer(self, module: str) -> LayerPlan:
        for layer in self.layers:
            if layer.module == module:
                return layer
        raise KeyError(f"the plan does not adapt {module!r}")

    def param_specs(self) -> dict[str, ParamSpec]:
        """Full key -> ParamSpec, layers first, shared tensors last."""
        specs = {layer.key(p.name): p for layer in self.layers for p in layer.params}
        specs.update({p.name: p for p in self.shared})
        return specs

    def num_parameters(self, role: Role | None = None) -> int:
        return sum(p.numel for p in self.param_specs().values() if role is None or p.role == role)
