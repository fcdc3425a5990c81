"""LoRA on torch's ``nn.MultiheadAttention`` (layer type ``mha``), laid out as HF PEFT 0.21 lays it out.

PEFT adapts both projections of the attention: the fused in_proj (A ∈ R^{r×E}, B ∈ R^{3E×r}, keys
``<mha>.lora_A.weight`` / ``<mha>.lora_B.weight``) and out_proj, which it wraps as a nested LoRA Linear (keys
``<mha>.base_layer.out_proj.lora_A.weight`` / ``...lora_B.weight``). Attention is not linear in W_in, so the
adapter cannot be added to the output: the attention runs with W' = W + ΔW, the IR weight of an ``mha`` layer
being in_proj [3E, E] stacked over out_proj [E, E]:

    ΔW = [ s · B_in A_in ; 2s · B_out A_out ]

The factor 2 on out_proj is PEFT 0.21's: its MultiheadAttention merge writes W_out + s·B A and then also calls
the nested Linear's merge, which adds s·B A again in place, outside autograd (forward, merge_and_unload and
saved models all see 2s, while training gradients of B_out and A_out see s; the upstream fix,
huggingface/peft#3774, is open). :data:`PEFT_OUT_PROJ_FACTOR` keeps the factor in one place; the plan's
``out_proj_scaling`` (2s) is the value and ``out_proj_grad_scaling`` (s) the scale gradients flow through.

PEFT merges the weights around the attention call, so ``lora_dropout`` never acts on an MHA layer; it refuses
DoRA, aLoRA, VeLoRA and KaSA there, and reads no ``.weight`` for PiSSA/OLoRA/EVA-style initialisations (they
fail or are skipped): peftdecl accepts ``init_lora_weights`` true, false and ``"gaussian"`` on MHA and refuses
the rest, and ``lora_bias`` (PEFT adds out_proj's lora bias outside autograd, so it never trains, and never
applies in_proj's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from peftdecl.errors import SpecError, TargetError
from peftdecl.plan.ir import LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.spec.lora import LoraSpec

KIND = "lora_mha"
OUT_PROJ_PREFIX = "base_layer.out_proj."
"""Where PEFT keeps out_proj's LoRA tensors, relative to the MultiheadAttention module."""
PEFT_OUT_PROJ_FACTOR = 2.0
"""PEFT 0.21 applies out_proj's update twice (see the module docstring)."""
MHA_INITS = (True, False, "gaussian")


def check_mha_spec(spec: LoraSpec, module: str) -> None:
    """SpecError for the LoRA options HF PEFT cannot apply to an nn.MultiheadAttention layer."""
    problems = []
    if spec.init_lora_weights not in MHA_INITS:
        problems.append(
            (
                "$.init_lora_weights",
                f"{module} is an nn.MultiheadAttention: LoRA there initialises with true, false or 'gaussian' "
                f"only (HF PEFT's initialisations that read a layer's weight do not apply), got "
                f"{spec.init_lora_weights!r}",
            )
        )
    if spec.lora_bias:
        problems.append(
            (
                "$.lora_bias",
                f"{module} is an nn.MultiheadAttention: HF PEFT applies lora_bias there only in part (out_proj's, "
                "never trained; in_proj's not at all), so peftdecl refuses it; set it to false",
            )
        )
    if spec.bias != "none":  # PEFT's keys for them nest twice (mha.base_layer.out_proj.base_layer.bias)
        problems.append(
            (
                "$.bias",
                f"{module} is an nn.MultiheadAttention: training base biases beside it (bias={spec.bias!r}) is "
                "not supported by peftdecl; set bias to 'none'",
            )
        )
    if problems:
        raise SpecError(problems)


def check_inside_attention(layers: Sequence[LayerPlan]) -> None:
    """TargetError when a target lies inside an adapted MultiheadAttention (its out_proj): the attention reads
    that layer's weight directly, so an adapter there would never run (HF PEFT nests it without effect)."""
    attentions = [lp.module for lp in layers if lp.kind == KIND]
    for lp in layers:
        outer = next((m for m in attentions if lp.module.startswith(m + ".")), None)
        if outer is not None:
            raise TargetError(
                f"target_modules selects {lp.module} inside the MultiheadAttention {outer}, which LoRA already "
                f"adapts whole (in_proj and out_proj); target {outer} alone"
            )


def mha_params(spec: LoraSpec, layer: LayerInfo, r: int) -> tuple[ParamSpec, ...]:
    """in_proj's factors (as a linear E → 3E layer) and out_proj's (E → E, under :data:`OUT_PROJ_PREFIX`)."""
    from peftdecl.plan.kinds.lora import build_lora_params

    embed = layer.in_features
    in_proj = LayerInfo("linear", embed, layer.out_features, dtype=layer.dtype)
    out_proj = LayerInfo("linear", embed, embed, dtype=layer.dtype)
    outer = build_lora_params(spec, in_proj, r)
    inner = tuple(replace(p, name=OUT_PROJ_PREFIX + p.name) for p in build_lora_params(spec, out_proj, r))
    return outer + inner


def build_mha_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One MultiheadAttention layer: PEFT's rank/alpha for ``module`` (out_proj shares them) and both factor
    pairs; ``options["out_proj_scaling"]`` is the scaling out_proj's ΔW is applied with (2s, as in PEFT 0.21),
    ``options["out_proj_grad_scaling"]`` the one its factors' gradients see (s, as in PEFT 0.21)."""
    from peftdecl.plan.kinds.lora import lora_scaling, rank_and_alpha

    check_mha_spec(spec, module)
    r, alpha = rank_and_alpha(spec, module)
    scaling = lora_scaling(alpha, r, spec.use_rslora)
    return LayerPlan(
        module=module,
        layer=layer,
        kind=KIND,
        params=mha_params(spec, layer, r),
        r=r,
        alpha=float(alpha),
        scaling=scaling,
        options={
            "out_proj_scaling": PEFT_OUT_PROJ_FACTOR * scaling,
            "out_proj_grad_scaling": scaling,
            "num_heads": layer.num_heads,
        },
    )


LAYOUT = KindLayout(kind=KIND, build_layer=build_mha_layer)
