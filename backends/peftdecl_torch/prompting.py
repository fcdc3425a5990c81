"""Feeding a prompt-learning adapter's virtual tokens to a transformers decoder-only model.

Prompt tuning goes through ``inputs_embeds`` ([P; embed(ids)], the mask and labels extended as HF PEFT does),
prefix tuning through the model's KV cache (a ``DynamicCache`` holding every layer's key/value prefix, grouped-query
attention included, with position ids shifted by T). ``generate`` gets the same inputs on its first step through a
``prepare_inputs_for_generation`` override that is removed when generation ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftdecl.errors import PeftdeclError
from peftdecl_torch.kinds.prompt import PromptAdapter, key_values, prepend


def _check_supported(adapter: PromptAdapter) -> None:
    if adapter.plan.num_transformer_submodules != 1:
        raise PeftdeclError(
            f"{adapter.plan.kind} on an encoder-decoder model (num_transformer_submodules = 2) is not supported by "
            "the torch backend yet; decoder-only models are"
        )


def prefix_cache(adapter: PromptAdapter, batch: int, dtype: torch.dtype) -> Any:
    """A transformers DynamicCache holding every layer's (K, V) prefix for ``batch`` rows."""
    from transformers import DynamicCache

    layers = key_values(adapter.plan, adapter.table().to(dtype), batch)
    return DynamicCache([(k, v) for k, v, *_ in layers])


def prompt_call(
    call: Callable[..., Any],
    adapter: PromptAdapter,
    embed: nn.Module,
    dtype: torch.dtype,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``call(**inputs)`` with the adapter's virtual tokens added to the inputs (HF PEFT's causal-LM rules)."""
    _check_supported(adapter)
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise PeftdeclError(
                "with a prompt-learning adapter pass the model's inputs by keyword (input_ids=..., "
                "attention_mask=..., labels=...)"
            )
        kwargs["input_ids"] = args[0]
    input_ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if input_ids is None and embeds is None:
        raise PeftdeclError("a prompt-learning adapter needs input_ids or inputs_embeds")
    batch = (input_ids if input_ids is not None else embeds).shape[0]
    t = adapter.plan.num_virtual_tokens
    mask = kwargs.pop("attention_mask", None)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = None  # HF PEFT ignores token type ids here (with a warning)
    if adapter.plan.kind == "prefix_tuning":
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + t  # the cache already holds T positions
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, t), mask], dim=1)
        kwargs["past_key_values"] = prefix_cache(adapter, batch, dtype)
        return call(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = None  # HF PEFT drops them: they would not cover the virtual tokens
    if embeds is None:
        embeds = embed(input_ids)
    embeds, mask, labels = prepend(adapter.table(), embeds, mask, kwargs.pop("labels", None))
    return call(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)


@contextmanager
def generation_inputs(
    model: nn.Module, adapter: PromptAdapter, embed: nn.Module, dtype: torch.dtype
) -> Iterator[None]:
    """Override ``model.prepare_inputs_for_generation`` for the duration of one ``generate`` call."""
    _check_supported(adapter)
    original = model.prepare_inputs_for_generation
    had_own = "prepare_inputs_for_generation" in model.__dict__
    t = adapter.plan.num_virtual_tokens
    prefix = adapter.plan.kind == "prefix_tuning"

    def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = original(*args, **kwargs)
        ids = inputs["input_ids"]
        cache = inputs.get("past_key_values")
        position = inputs.get("cache_position")
        prefill = position is not None and int(position[0]) == 0
        filled = cache is not None and cache.get_seq_length() > 0
        if filled and cache.get_seq_length() >= ids.shape[1]:
            ids = inputs["input_ids"] = ids[:, -1:]  # the cache is longer than the ids: feed the last token
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise PeftdeclError("prompt-learning generation needs a 2-D attention mask")
            inputs["attention_mask"] = torch.cat([mask.new_ones(ids.shape[0], t), mask], dim=1)
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + t if prefix else None
        if not filled:
            if prefix:
                inputs["past_key_values"] = prefix_cache(adapter, ids.shape[0], dtype)
            else:
                inputs["inputs_embeds"] = prepend(adapter.table(), embed(ids), None, None)[0]
                inputs["input_ids"] = None
        if prefix and prefill:
            inputs["cache_position"] = position + t
        elif not prefix:
            inputs.pop("cache_position", None)  # the model derives it from the (longer) embeddings
        return inputs

    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if had_own:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation
