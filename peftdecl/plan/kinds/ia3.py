"""IA3 layout: one learned vector ``ia3_l`` per layer, scaling the output, y = l ⊙ (W x + b), or for
feed-forward modules the input, y = W (l ⊙ x) + b. Shapes as in HF PEFT: Linear and GPT-2 Conv1D (out, 1) or
(1, in); Conv2d (1, C, 1, 1), Conv3d (1, C, 1, 1, 1).

Feed-forward membership follows HF PEFT's own rule, which differs from target matching: a list entry matches
any module name ending with it (a raw string suffix, no '.' boundary), a string is a full-match regex; a null
list takes the model type's default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peftdecl.errors import TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.targeting import IA3_DEFAULT_TARGETS
from peftdecl.spec.ia3 import IA3Spec


def feedforward_selector(spec: IA3Spec, info: ModelInfo) -> str | Sequence[str]:
    """The spec's ``feedforward_modules``, or the model type's default when it is null (as HF PEFT)."""
    if spec.feedforward_modules is not None:
        return spec.feedforward_modules
    if info.model_type not in IA3_DEFAULT_TARGETS:
        raise TargetError(
            f"feedforward_modules is null and there is no IA3 default for model type {info.model_type!r}; "
            "list the feed-forward modules ([] for none)"
        )
    return IA3_DEFAULT_TARGETS[info.model_type][1]


def is_feedforward(module: str, selector: str | Sequence[str]) -> bool:
    """HF PEFT's feed-forward test: full-match regex for a string, raw suffix for a list."""
    if isinstance(selector, str):
        return re.fullmatch(selector, module) is not None
    return any(module.endswith(entry) for entry in selector)


def ia3_shape(layer: LayerInfo, feedforward: bool) -> tuple[int, ...]:
    """(out, 1) or (1, in) for Linear/Conv1D; (1, C, 1, ...) for Conv2d/Conv3d, C = in (feed-forward) or out."""
    if layer.is_conv:
        channels = layer.in_features if feedforward else layer.out_features
        return (1, channels, *(1,) * len(layer.kernel_size))
    return (1, layer.in_features) if feedforward else (layer.out_features, 1)


def build_ia3_layer(spec: IA3Spec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One IA3 layer: its vector's orientation and initialisation (ones: a no-op; N(0, 1) when not)."""
    feedforward = is_feedforward(module, feedforward_selector(spec, info))
    init = Init("ones") if spec.init_ia3_weights else Init("normal", std=1.0)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="ia3",
        params=(ParamSpec("ia3_l", ia3_shape(layer, feedforward), "trainable", init),),
        # PEFT sets fan_in_fan_out from the layer (on for GPT-2 Conv1D, off otherwise), whatever the spec
        options={"feedforward": feedforward, "fan_in_fan_out": layer.type == "gpt2_conv1d"},
    )


LAYOUT = KindLayout(kind="ia3", build_layer=build_ia3_layer)
