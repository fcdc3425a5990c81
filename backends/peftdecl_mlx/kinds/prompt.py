"""Prefix tuning (Li & Liang, 2021) and prompt tuning (Lester et al., 2021) on mlx-lm models.

P is the virtual-token table (through the projection MLP tanh(E W₀ᵀ + b₀) W₂ᵀ + b₂ while training with
``prefix_projection``). Prompt tuning runs the model on ``input_embeddings = [P; embed(ids)]`` and returns the
logits of all T + S positions, as HF PEFT does. Prefix tuning starts every layer's KV cache with
K_l = P[:, slot 2l], V_l = P[:, slot 2l + 1] split into the KV heads, so the real tokens sit at positions T…
and attend to the prefix (HF PEFT's past_key_values). The tables live in ``model["prompt_encoder"][name]`` so
that ``mx.value_and_grad`` trains them; nothing here touches a layer, and nothing is mergeable.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from peftdecl.errors import BackendError
from peftdecl.plan import Plan, PromptPlan

ENCODER = "prompt_encoder"
Params = dict[str, mx.array]


class KVCache(Protocol):
    """What prefix tuning needs of an mlx-lm KV cache (``mlx_lm.models.cache.KVCache`` and its kin)."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]: ...


class PromptOps:
    """Marks the prompt-learning kinds: nothing per layer, not additive, not mergeable."""

    kind = "prompt"
    additive = False


OPS = PromptOps()


def table(p: Params) -> mx.array:
    """P: the stored table, or the projection MLP's output."""
    if "prompt_embeddings" in p:
        return p["prompt_embeddings"]
    hidden = mx.tanh(p["embedding.weight"] @ p["transform.0.weight"].T + p["transform.0.bias"])
    return hidden @ p["transform.2.weight"].T + p["transform.2.bias"]


def key_values(pp: PromptPlan, prefix: mx.array, batch: int) -> list[tuple[mx.array, mx.array]]:
    """Per layer (K, V), each (B, H, T, D): P[t, ((2l + kv)·H + h)·D + i] is (K or V)[b, h, t, i] of layer l."""
    heads = pp.num_attention_heads
    slots = prefix.reshape(pp.num_virtual_tokens, 2 * pp.num_layers, heads, pp.token_dim // heads)
    by_slot = slots.transpose(1, 2, 0, 3)  # (2L, H, T, D)
    shape = (batch, *by_slot.shape[1:])
    return [
        (mx.broadcast_to(by_slot[2 * i], shape), mx.broadcast_to(by_slot[2 * i + 1], shape))
        for i in range(pp.num_layers)
    ]


def check_model(model: nn.Module, plan: Plan) -> None:
    """Refuse, naming the model class, what its call signature cannot take."""
    pp = plan.prompt
    assert pp is not None
    wanted = "input_embeddings" if pp.kind == "prompt_tuning" else "cache"
    params = inspect.signature(type(model).__call__).parameters
    if wanted not in params:
        raise BackendError(
            f"{pp.kind} needs {type(model).__module__}.{type(model).__name__}.__call__ to take {wanted}=; "
            f"it takes {', '.join(list(params)[1:])}"
        )
    if pp.num_transformer_submodules != 1:
        raise BackendError(f"{pp.kind} with an encoder-decoder model is not supported by the mlx backend")
    if pp.kind == "prefix_tuning" and not hasattr(model, "make_cache") and not hasattr(model, "layers"):
        raise BackendError(
            f"prefix_tuning needs {type(model).__name__}.make_cache() or .layers to build KV caches"
        )


def prefilled_cache(model: nn.Module, pp: PromptPlan, p: Params, batch: int) -> list[KVCache]:
    """The model's KV caches, each holding its layer's prefix (pass them to later generation steps)."""
    from mlx_lm.models import cache as mlx_lm_cache

    caches: list[KVCache] = (
        model.make_cache() if hasattr(model, "make_cache") else [mlx_lm_cache.KVCache() for _ in model.layers]
    )
    if len(caches) != pp.num_layers:
        raise BackendError(
            f"the prefix has {pp.num_layers} layers, {type(model).__name__} has {len(caches)} caches"
        )
    for cache, (k, v) in zip(caches, key_values(pp, table(p), batch), strict=True):
        cache.update_and_fetch(k, v)
    return caches


def forward(
    model: nn.Module, pp: PromptPlan, p: Params, embed: nn.Module, inputs: mx.array, *args: Any, **kwargs: Any
) -> Any:
    """The model's call with the virtual tokens in place (token ids ``inputs`` [B, S])."""
    batch = inputs.shape[0]
    if pp.kind == "prompt_tuning":
        if kwargs.get("cache") is not None and any(getattr(c, "offset", 0) for c in kwargs["cache"]):
            return model(
                inputs, *args, **kwargs
            )  # a later generation step: the prompt is in the cache already
        prompt = table(p)
        real = embed(inputs)
        virtual = mx.broadcast_to(prompt.astype(real.dtype), (batch, *prompt.shape))
        return model(inputs, *args, input_embeddings=mx.concatenate([virtual, real], axis=1), **kwargs)
    if kwargs.get("cache") is None:
        kwargs["cache"] = prefilled_cache(model, pp, p, batch)
    return model(inputs, *args, **kwargs)
