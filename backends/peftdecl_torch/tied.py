"""Weights tied to the input embeddings (``tie_word_embeddings``) on torch: which modules share the table, and how a
layer plan that reads another layer's adapter tensor (a tied head's trainable tokens) is linked to it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from peftdecl.plan import LayerPlan, ModelInfo, Plan

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer
    from peftdecl_torch.saved import SavedModule


def tied_to_embeddings(model: nn.Module) -> tuple[str, ...]:
    """Modules (``lm_head``) whose ``weight`` is the input embeddings' very parameter, where the model declares tied
    weights (``_tied_weights_keys``) and its config does not switch tying off, as HF PEFT reads them."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", None) is False or not getattr(
        model, "_tied_weights_keys", None
    ):
        return ()
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return ()
    return tuple(
        name
        for name, sub in model.named_modules(remove_duplicate=False)
        if name and sub is not embedding and getattr(sub, "weight", None) is weight
    )


def tied_links(
    adapter: str, lp: LayerPlan, layer: AdaptedLayer, layers: dict[str, AdaptedLayer]
) -> dict[str, str]:
    """Register on ``layer`` the tensors ``lp`` reads from another adapted layer of the same adapter
    (``lp.options["tied_to"]``: that layer's module); returns tensor name -> the attribute holding it. The tensor is
    the other layer's parameter itself, so training either layer trains the one tensor."""
    source = lp.options.get("tied_to")
    if source is None:
        return {}
    tensor = lp.options["tensor"]
    attr = f"tied_{adapter}_{tensor.replace('.', '_')}"
    layer.add_shared(attr, layers[source].tensors(adapter)[tensor])
    return {tensor: attr}


def tie_saved_copies(adapter: str, plan: Plan, info: ModelInfo, saved: Mapping[str, SavedModule]) -> None:
    """``ensure_weight_tying``: the modules_to_save copy of each head tied to the embeddings takes the embeddings'
    copy's weight parameter itself, as HF PEFT ties them (one tensor, trained through both uses)."""
    embedding = info.word_embeddings
    if not getattr(plan.spec, "ensure_weight_tying", False) or embedding not in plan.modules_to_save:
        return
    source = saved[embedding].copies[adapter].weight
    for module in plan.modules_to_save:
        if module in info.tied_to_embeddings:
            saved[module].copies[adapter].weight = source


def tie_lora(adapter: str, lp: LayerPlan, layer: AdaptedLayer, layers: Mapping[str, AdaptedLayer]) -> None:
    """``ensure_weight_tying`` with LoRA on the embeddings: a tied head's A and B become parameters over the
    embeddings' Bᵀ and Aᵀ storage (``lp.options["tied_lora_to"]``), as HF PEFT ties them: their values are one."""
    source = lp.options.get("tied_lora_to")
    if source is None:
        return
    embedding = layers[source].tensors(adapter)
    own = layer.tensors(adapter)
    for name, partner in (("lora_A.weight", "lora_embedding_B"), ("lora_B.weight", "lora_embedding_A")):
        head, _, leaf = name.partition(".")
        tied = nn.Parameter(embedding[partner].detach().t(), requires_grad=own[name].requires_grad)
        getattr(layer, head)[adapter].register_parameter(leaf, tied)
