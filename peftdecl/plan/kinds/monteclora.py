"""MonteCLoRA layout: LoRA's A and B plus HF PEFT's sampler tensors (``lora_monteclora_sampler.<name>``), r the
rank and N ``num_samples``:

- ``std_prior`` (r, trainable, U[0, 1)): log standard deviations of the noise per rank column;
- ``expert_weights_prior`` (N, trainable, U[0, 1)): log Dirichlet concentrations of the sample weights;
- ``gaussian_var_prior`` (r × r, frozen, I): the noise covariance drawn at the last training step;
- ``expert_weights`` (N, frozen, 1/N): the sample weights drawn at the last training step.

The options carry the config for the ops (noise scale, KL weight, prior, entropy flag).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from peftdecl.errors import TargetError
from peftdecl.init import register_external_source
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import build_lora_layer
from peftdecl.spec.lora import LoraSpec

SAMPLER = "lora_monteclora_sampler"
STD_PRIOR = f"{SAMPLER}.std_prior"
EXPERT_PRIOR = f"{SAMPLER}.expert_weights_prior"
VAR_PRIOR = f"{SAMPLER}.gaussian_var_prior"
EXPERT_WEIGHTS = f"{SAMPLER}.expert_weights"
IDENTITY_SOURCE = "monteclora_identity"


def _identity(weight: np.ndarray, lp: LayerPlan, own: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.eye(lp.r)


register_external_source(IDENTITY_SOURCE, _identity)


def build_monteclora_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """LoRA's plan with the sampler's four tensors added."""
    config = spec.monteclora_config
    if config is None:
        raise TargetError(f"{module}: the monteclora kind needs $.monteclora_config")
    lora = build_lora_layer(spec, module, layer, info)
    r, n = lora.r, config.num_samples
    sampler = (
        ParamSpec(STD_PRIOR, (r,), "trainable", Init("uniform", low=0.0, high=1.0)),
        ParamSpec(EXPERT_PRIOR, (n,), "trainable", Init("uniform", low=0.0, high=1.0)),
        ParamSpec(VAR_PRIOR, (r, r), "frozen", Init("external", source=IDENTITY_SOURCE)),
        ParamSpec(EXPERT_WEIGHTS, (n,), "frozen", Init("constant", value=1.0 / n)),
    )
    return LayerPlan(
        module=module,
        layer=layer,
        kind="monteclora",
        params=(*lora.params, *sampler),
        r=r,
        alpha=lora.alpha,
        scaling=lora.scaling,
        options={
            **lora.options,
            "num_samples": n,
            "sample_scaler": config.sample_scaler,
            "kl_loss_weight": config.kl_loss_weight,
            "dirichlet_prior": config.dirichlet_prior,
            "use_entropy": config.use_entropy,
        },
    )


LAYOUT = KindLayout(kind="monteclora", build_layer=build_monteclora_layer)
