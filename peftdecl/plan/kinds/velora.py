"""VeLoRA layout: LoRA's A and B plus the projection v ∈ R^{⌈in / G⌉} (``lora_velora_embed``, frozen; G is
``num_groups``), a unit vector the backward of A compresses each group of input features onto.

``init_type`` 'random': v is a random unit vector; otherwise v starts at zero and the first training batch sets it
(every batch with 'batch_average'). The options carry G, the scale and the init type for the ops.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np

from peftdecl.errors import TargetError
from peftdecl.init import register_external_source
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import build_lora_layer
from peftdecl.spec.lora import LoraSpec

EMBED = "lora_velora_embed"
RANDOM_EMBED_SOURCE = "velora_random_unit"


def group_dim(in_features: int, num_groups: int) -> int:
    """Features per group, ⌈in / G⌉ (the last group is zero-padded)."""
    return -(-in_features // num_groups)


def _random_unit(weight: np.ndarray, lp: LayerPlan, own: Mapping[str, np.ndarray]) -> np.ndarray:
    # an external source gets no generator; seeding from the freshly drawn A makes v follow the attach seed
    seed = zlib.crc32(np.ascontiguousarray(own["lora_A.weight"], dtype=np.float64).tobytes())
    v = np.random.default_rng([seed, zlib.crc32(lp.module.encode())]).standard_normal(lp.param(EMBED).shape)
    unit: np.ndarray = v / np.linalg.norm(v)
    return unit


register_external_source(RANDOM_EMBED_SOURCE, _random_unit)


def build_velora_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """LoRA's plan with the projection v added; VeLoRA runs on linear layers only (HF PEFT refuses the rest)."""
    config = spec.velora_config
    if config is None:
        raise TargetError(f"{module}: the velora kind needs $.velora_config")
    lora = build_lora_layer(spec, module, layer, info)
    init = Init("external", source=RANDOM_EMBED_SOURCE) if config.init_type == "random" else Init("zeros")
    embed = ParamSpec(EMBED, (group_dim(layer.in_features, config.num_groups),), "frozen", init)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="velora",
        params=(*lora.params, embed),
        r=lora.r,
        alpha=lora.alpha,
        scaling=lora.scaling,
        options={
            **lora.options,
            "num_groups": config.num_groups,
            "velora_scale": config.scale,
            "init_type": config.init_type,
        },
    )


LAYOUT = KindLayout(kind="velora", build_layer=build_velora_layer)
