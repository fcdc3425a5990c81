"""Arrow layout (HF PEFT's ``arrow_config``): a router over E LoRA experts of one rank r on a linear layer.

The router keeps its own LoRA pair (``lora_A.weight``, ``lora_B.weight``, which PEFT creates and never uses) and,
for peftdecl's ops, copies of the experts' factors stacked in task order: ``arrow_experts_A`` [E, r, in],
``arrow_experts_B`` [E, out, r], their scales ``arrow_experts_scaling`` [E] (s_e = alpha_e / r_e) and prototypes
``arrow_prototypes`` [E, in] (the top right singular vector of each B_e A_e, which PEFT computes once and caches).
``create_arrow_model`` (peftdecl.arrow) fills them from the expert adapters; nothing of the router trains.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from peftdecl._json import JsonObject
from peftdecl.errors import AdapterFileError, SpecError
from peftdecl.init import register_external_source
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec, Plan
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import build_lora_layer
from peftdecl.spec.lora import LoraSpec

EXPERT_TENSORS = ("arrow_experts_A", "arrow_experts_B", "arrow_experts_scaling", "arrow_prototypes")
PROTOTYPE_SOURCE = "arrow_exact_prototypes"


def exact_prototypes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[E, in]: the top right singular vector of each B_e A_e, from two small SVDs (A_e = U S Vᵀ, then B_e U S)."""
    found = []
    for a_e, b_e in zip(np.asarray(a, np.float64), np.asarray(b, np.float64), strict=True):
        u, s, vh = np.linalg.svd(a_e, full_matrices=False)
        found.append(np.linalg.svd((b_e @ u) * s, full_matrices=False)[2][0] @ vh)
    return np.stack(found)


def _initial_prototypes(weight: np.ndarray, lp: LayerPlan, own: Mapping[str, np.ndarray]) -> np.ndarray:
    return exact_prototypes(own["arrow_experts_A"], own["arrow_experts_B"])


register_external_source(PROTOTYPE_SOURCE, _initial_prototypes)


def build_arrow_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """The router's LoRA pair (frozen: unused) and the stacked expert tensors, options top_k and temperature."""
    config = spec.arrow_config
    if config is None or not config.task_adapter_names:
        raise SpecError(
            [
                (
                    "$.arrow_config.task_adapter_names",
                    "names no expert; build the router with create_arrow_model",
                )
            ]
        )
    lora = build_lora_layer(spec, module, layer, info)
    experts, r = len(config.task_adapter_names), lora.r
    if config.top_k > experts:
        raise SpecError([("$.arrow_config.top_k", f"must be <= the number of experts, {experts}")])
    own = tuple(ParamSpec(p.name, p.shape, "frozen", p.init) for p in lora.params)
    stacked = (
        ParamSpec("arrow_experts_A", (experts, r, layer.in_features), "frozen", Init("normal", std=1.0)),
        ParamSpec("arrow_experts_B", (experts, layer.out_features, r), "frozen", Init("normal", std=1.0)),
        ParamSpec("arrow_experts_scaling", (experts,), "frozen", Init("constant", value=lora.scaling)),
        ParamSpec(
            "arrow_prototypes",
            (experts, layer.in_features),
            "frozen",
            Init("external", source=PROTOTYPE_SOURCE),
        ),
    )
    return LayerPlan(
        module=module,
        layer=layer,
        kind="arrow",
        params=own + stacked,
        r=r,
        alpha=lora.alpha,
        scaling=lora.scaling,
        options={**lora.options, "top_k": config.top_k, "temperature": config.router_temperature},
    )


def router_file(plan: Plan, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], JsonObject]:
    """What HF PEFT saves of a router: its own LoRA pair and config, not the experts (saved as their adapters)."""
    return {k: v for k, v in arrays.items() if not k.endswith(EXPERT_TENSORS)}, {}


def router_from_file(plan: Plan, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A saved router holds no experts: as in HF PEFT it is rebuilt from them, not loaded."""
    if not any(k.endswith(EXPERT_TENSORS) for k in arrays):
        raise AdapterFileError(
            "an Arrow router's file holds no experts; build the router from the expert adapters with "
            "peftdecl.create_arrow_model, as HF PEFT does"
        )
    return arrays


# not mergeable: each token mixes its own experts (HF PEFT refuses to merge the router too)
LAYOUT = KindLayout(
    kind="arrow",
    build_layer=build_arrow_layer,
    mergeable=False,
    to_file=router_file,
    from_file=router_from_file,
)
