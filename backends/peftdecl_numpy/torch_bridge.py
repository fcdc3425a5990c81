"""Describe a torch model to the NumPy reference: its state dict as float64 arrays, layer types and model facts.

Imports torch only when called, so the NumPy backend itself never needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def numpy_model(module: Any) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """``(state_dict, layer_types, facts)`` for ``peftdecl.attach(state_dict, spec, layer_types=..., **facts)``."""
    import torch

    state = {k: v.detach().to(torch.float64).cpu().numpy() for k, v in module.state_dict().items()}
    layer_types: dict[str, Any] = {}
    for name, sub in module.named_modules():
        kind = _layer_type(sub, torch)
        if kind is None or f"{name}.weight" not in state:
            continue
        if kind in ("conv1d", "conv2d"):
            layer_types[name] = {
                "type": kind,
                "stride": list(sub.stride),
                "padding": list(sub.padding),
                "dilation": list(sub.dilation),
                "groups": sub.groups,
            }
        elif kind != "linear":
            layer_types[name] = kind
    return state, layer_types, model_facts(module)


def _layer_type(sub: Any, torch: Any) -> str | None:
    if isinstance(sub, torch.nn.Linear):
        return "linear"
    if isinstance(sub, torch.nn.Embedding):
        return "embedding"
    if isinstance(sub, torch.nn.Conv1d):
        return "conv1d"
    if isinstance(sub, torch.nn.Conv2d):
        return "conv2d"
    if type(sub).__name__ == "Conv1D" and hasattr(sub, "nf"):
        return "gpt2_conv1d"
    return None


def model_facts(module: Any) -> dict[str, Any]:
    """The ModelInfo fields a transformers model's config and embeddings provide."""
    names = {id(sub): name for name, sub in module.named_modules()}
    facts: dict[str, Any] = {"model_class": (type(module).__name__, type(module).__module__)}
    if hasattr(module, "get_output_embeddings"):
        head = module.get_output_embeddings()
        facts["output_head"] = names.get(id(head)) if head is not None else None
    if hasattr(module, "get_input_embeddings"):
        emb = module.get_input_embeddings()
        facts["word_embeddings"] = names.get(id(emb)) if emb is not None else None
    config = getattr(module, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        facts["model_type"] = getattr(config, "model_type", None)
        facts["is_encoder_decoder"] = bool(getattr(config, "is_encoder_decoder", False))
        for field, keys in {
            "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
            "hidden_size": ("hidden_size", "n_embd", "d_model"),
            "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
            "num_key_value_heads": ("num_key_value_heads",),
            "head_dim": ("head_dim",),
            "vocab_size": ("vocab_size",),
        }.items():
            for key in keys:
                value = getattr(text, key, None)
                if value is not None:
                    facts[field] = int(value)
                    break
    return facts


def vera_projections(
    prng_key: int, r: int, max_in: int, max_out: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """HF PEFT's VeRA projections as torch draws them on this machine (None when torch is not installed):
    one CPU generator seeded with ``prng_key``, A ∈ R^{r×max_in} first, then B ∈ R^{max_out×r}."""
    try:
        import torch
    except ImportError:
        return None
    from peftdecl.plan.kinds.vera import kaiming_bound

    gen = torch.Generator(device="cpu").manual_seed(prng_key)
    bound_a, bound_b = kaiming_bound(max_in), kaiming_bound(r)
    a = torch.empty(r, max_in).uniform_(-bound_a, bound_a, generator=gen)
    b = torch.empty(max_out, r).uniform_(-bound_b, bound_b, generator=gen)
    return a.double().numpy(), b.double().numpy()
