"""LoRA layout: A ∈ R^{r×in} and B ∈ R^{out×r} (conv: A a k×k conv to r channels, B a 1×1 conv with the base's
groups, so B is [out, r/groups, 1, ...]), s = alpha/r."""

from __future__ import annotations

import math
from collections.abc import Iterable

from peftdecl.errors import PeftdeclError, TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec, Plan
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora_mha import build_mha_layer
from peftdecl.plan.targeting import pattern_value
from peftdecl.spec.lora import LoraSpec
from peftdecl.spec.lycoris import LycorisSpec

KAIMING_A = math.sqrt(5.0)


def rank_and_alpha(
    spec: LoraSpec | LycorisSpec, module: str, alpha_field: str = "lora_alpha"
) -> tuple[int, float]:
    """The layer's rank and alpha after ``rank_pattern`` / ``alpha_pattern``."""
    r = int(pattern_value(spec.rank_pattern or {}, module, spec.r))
    default: float = getattr(spec, alpha_field)
    alpha = pattern_value(spec.alpha_pattern or {}, module, default)
    return r, alpha


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / √r with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def linear_default_init(fan_in: int) -> Init:
    """torch's nn.Linear / nn.ConvNd default weight init: Kaiming-uniform with a = √5, bound 1/√fan_in."""
    return Init("kaiming_uniform", fan_in=fan_in, a=KAIMING_A)


def build_lora_params(spec: LoraSpec, layer: LayerInfo, r: int) -> tuple[ParamSpec, ...]:
    """HF PEFT's LoRA tensors for one layer, with its initialisation rules."""
    init = spec.init_lora_weights
    if layer.type == "embedding":
        if init is False:
            a_init, b_init = Init("normal", std=1.0), Init("normal", std=1.0)
        else:
            a_init, b_init = Init("zeros"), Init("normal", std=1.0)
        return (
            ParamSpec("lora_embedding_A", (r, layer.in_features), "trainable", a_init),
            ParamSpec("lora_embedding_B", (layer.out_features, r), "trainable", b_init),
        )
    if layer.is_conv:
        # B is a 1×1 conv with the base's groups, so it reads r / groups of A's channels per output channel
        a_shape = (r, layer.in_features, *layer.kernel_size)
        b_shape = (layer.out_features, r // layer.groups, *(1,) * len(layer.kernel_size))
        a_fan_in, b_fan_in = layer.in_features * layer.kernel_numel, r // layer.groups
    else:
        a_shape, b_shape = (r, layer.in_features), (layer.out_features, r)
        a_fan_in, b_fan_in = layer.in_features, r
    if init is True or init in ("eva", "lora_ga"):  # B = 0 until EVA / LoRA-GA fill the factors in
        a_init, b_init = linear_default_init(a_fan_in), Init("zeros")
    elif init == "gaussian":
        a_init, b_init = Init("normal", std=1.0 / r), Init("zeros")
    else:
        a_init, b_init = linear_default_init(a_fan_in), linear_default_init(b_fan_in)
    params = [
        ParamSpec("lora_A.weight", a_shape, "trainable", a_init),
        ParamSpec("lora_B.weight", b_shape, "trainable", b_init),
    ]
    if spec.lora_bias:
        bias_init = (
            Init("uniform", low=-1 / math.sqrt(b_fan_in), high=1 / math.sqrt(b_fan_in))
            if init is False
            else Init("zeros")
        )
        params.append(ParamSpec("lora_B.bias", (layer.out_features,), "trainable", bias_init))
    return tuple(params)


def check_grouped_rank(module: str, layer: LayerInfo, r: int) -> None:
    """A grouped convolution's rank must be a multiple of its groups (B is a grouped 1×1 conv), as in HF PEFT."""
    if layer.is_conv and r % layer.groups != 0:
        raise TargetError(
            f"{module}: a {layer.type} with groups={layer.groups} needs a rank divisible by {layer.groups}, got "
            f"r={r}; set $.r (or this module's $.rank_pattern entry) to a multiple of {layer.groups}, or leave "
            "the layer out of $.target_modules"
        )


def refuse_grouped_merge(lp: LayerPlan) -> None:
    """A grouped conv's ΔW has no weight to merge into: B A joins every input channel to every output channel,
    which a conv with groups > 1 cannot hold (HF PEFT refuses these merges too)."""
    if lp.layer.groups > 1:
        raise PeftdeclError(
            f"{lp.module}: cannot merge {lp.kind} into a {lp.layer.type} with groups={lp.layer.groups}: "
            "its update B A connects every input channel to every output channel, which the grouped weight "
            "cannot hold (HF PEFT refuses this merge too); keep the adapter unmerged"
        )


def refuse_grouped_merges(plans: Iterable[Plan]) -> None:
    """:func:`refuse_grouped_merge` on every LoRA-factored layer of ``plans``, before a merge writes any weight."""
    for plan in plans:
        for lp in plan.layers:
            if lp.layer.is_conv and any(p.name == "lora_B.weight" for p in lp.params):
                refuse_grouped_merge(lp)


def build_lora_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One LoRA layer: rank/alpha patterns, scaling and the A/B tensors."""
    if layer.type == "mha":  # both projections of an nn.MultiheadAttention, with their own execution kind
        return build_mha_layer(spec, module, layer, info)
    r, alpha = rank_and_alpha(spec, module)
    check_grouped_rank(module, layer, r)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="lora",
        params=build_lora_params(spec, layer, r),
        r=r,
        alpha=float(alpha),
        scaling=lora_scaling(alpha, r, spec.use_rslora),
        options={
            "dropout": spec.lora_dropout,
            "fan_in_fan_out": layer.type == "gpt2_conv1d" or spec.fan_in_fan_out,
            "lora_bias": spec.lora_bias,
        },
    )


LAYOUT = KindLayout(
    kind="lora",
    build_layer=build_lora_layer,
)
