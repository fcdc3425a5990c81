"""Feeding a prompt-learning adapter's virtual tokens to a transformers decoder-only model, as HF PEFT does.

Prompt tuning goes through ``inputs_embeds``: the model runs on [P; embed(ids)], the attention mask gets T leading
ones and the labels T leading −100 (so the logits carry T extra leading positions). Prefix tuning goes through the
model's KV cache: a ``DynamicCache`` holding every layer's key/value prefix (grouped-query attention included),
the mask gets T leading ones and explicit position ids are shifted by T. ``generate`` gets the same inputs on its
first step through a ``prepare_inputs_for_generation`` override that is removed when generation ends, however it
ends. Models with a task head (``task_type`` SEQ_CLS, TOKEN_CLS, QUESTION_ANS) follow PEFT's rules for those
instead (:mod:`peftdecl_torch.task_heads`).
Encoder-decoder models (T5) are handled in :mod:`peftdecl_torch.seq2seq`; the helpers shared with it live here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from peftdecl.errors import PeftdeclError
from peftdecl_torch.kinds.prompt import PromptAdapter, key_values, prepend

if TYPE_CHECKING:
    from transformers import Cache, DynamicCache

ModelInputs = dict[str, Any]
"""A model call's keyword inputs (tensors, caches, flags, whatever else the user's model takes): values are
genuinely any, they are forwarded to the user's model."""


@dataclass(frozen=True)
class PromptSite:
    """Where a prompt adapter's virtual tokens enter a model call: the model (or its call), the adapter, the input
    word embeddings (prompt tuning looks ids up there) and the dtype the virtual tokens take."""

    model: nn.Module
    adapter: PromptAdapter
    embed: nn.Module
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        """T, the number of virtual tokens."""
        return self.adapter.plan.num_virtual_tokens

    @property
    def prefix(self) -> bool:
        """Prefix tuning (a KV-cache prefix) rather than prompt tuning (embeddings before the input's)."""
        return self.adapter.plan.kind == "prefix_tuning"


PromptCall = Callable[[PromptSite, tuple[object, ...], ModelInputs], object]
"""How a prompt adapter's virtual tokens reach a model call: ``call(site, args, kwargs)`` runs ``site.model`` on the
user's call arguments with them added, by one of HF PEFT's rule sets (language model, seq2seq, task head)."""


def ones_before(mask: torch.Tensor | None, batch: int, t: int) -> torch.Tensor | None:
    """[1_T, mask]: an attention mask covering T virtual positions first (None stays None)."""
    return None if mask is None else torch.cat([mask.new_ones(batch, t), mask], dim=1)


class GenerationModel(Protocol):
    """What this module uses of a transformers generation model beyond ``nn.Module``."""

    generate: Callable[..., object]
    prepare_inputs_for_generation: Callable[..., ModelInputs]


def generating(model: nn.Module) -> GenerationModel:
    """``model`` seen as a transformers generation model (the caller has checked it is one)."""
    return cast(GenerationModel, model)


CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The names transformers has given the KV-cache argument (5.x renamed ``past_key_values`` to ``cache``)."""


def cache_argument(model: Callable[..., object]) -> str:
    """The name under which ``model``'s forward takes its KV cache (``cache`` in recent transformers)."""
    forward = getattr(model, "forward", model)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def accepts_cache(model: Callable[..., object]) -> bool:
    """Whether ``model``'s forward takes a KV cache argument at all (BERT under transformers 5 does not)."""
    try:
        parameters = inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return True
    return any(name in parameters for name in CACHE_ARGUMENTS)


def keyword_inputs(args: tuple[object, ...], kwargs: ModelInputs) -> ModelInputs:
    """A copy of ``kwargs`` with one positional argument taken as ``input_ids`` (more are refused)."""
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise PeftdeclError(
                "with a prompt-learning adapter pass the model's inputs by keyword (input_ids=..., "
                "attention_mask=..., labels=...)"
            )
        kwargs["input_ids"] = args[0]
    return kwargs


def split_inputs(
    args: tuple[object, ...], kwargs: ModelInputs
) -> tuple[ModelInputs, torch.Tensor | None, torch.Tensor | None, int]:
    """``(other inputs, input_ids, inputs_embeds, batch size)`` of a call's arguments, read as
    :func:`keyword_inputs` reads them; the other inputs are a copy, the caller's ``kwargs`` stay as they are."""
    kwargs = keyword_inputs(args, kwargs)
    input_ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    return kwargs, input_ids, embeds, batch_size(input_ids, embeds)


def set_cache(inputs: ModelInputs, key: str, cache: object) -> None:
    """Put ``cache`` in ``inputs`` under ``key``, in place, after dropping the KV cache passed under any name."""
    for name in CACHE_ARGUMENTS:
        inputs.pop(name, None)
    inputs[key] = cache


def adjust_ids(adapter: PromptAdapter, kwargs: ModelInputs) -> None:
    """HF PEFT's ``_adjust_prompt_learning_kwargs``, in place: explicit position ids are shifted by T for prefix
    tuning (the cache already holds T positions) and dropped for prompt tuning; token type ids are dropped."""
    if kwargs.get("position_ids") is not None:
        if adapter.plan.kind == "prefix_tuning":
            kwargs["position_ids"] = kwargs["position_ids"] + adapter.plan.num_virtual_tokens
        else:
            kwargs["position_ids"] = None
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = None


def batch_size(input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> int:
    if input_ids is None and embeds is None:
        raise PeftdeclError("a prompt-learning adapter needs input_ids or inputs_embeds")
    return int((input_ids if input_ids is not None else embeds).shape[0])  # type: ignore[union-attr]


def prefix_cache(site: PromptSite, batch: int) -> DynamicCache:
    """A transformers DynamicCache holding every layer's (K, V) prefix for ``batch`` rows."""
    from transformers import DynamicCache

    layers = key_values(site.adapter.plan, site.adapter.table().to(site.dtype), batch)
    return DynamicCache([(k, v) for k, v, *_ in layers])


def check_decoder_only(adapter: PromptAdapter) -> None:
    if adapter.plan.num_transformer_submodules != 1:
        raise PeftdeclError(
            f"{adapter.plan.kind} with num_transformer_submodules = 2 needs an encoder-decoder model "
            "(config.is_encoder_decoder); this model is decoder-only: use num_transformer_submodules 1 "
            "(task_type CAUSAL_LM)"
        )


def prompt_call(site: PromptSite, args: tuple[object, ...], kwargs: ModelInputs) -> object:
    """``site.model(**inputs)`` with the adapter's virtual tokens added to the inputs (HF PEFT's causal-LM rules)."""
    check_decoder_only(site.adapter)
    kwargs, input_ids, embeds, batch = split_inputs(args, kwargs)
    mask = kwargs.pop("attention_mask", None)
    adjust_ids(site.adapter, kwargs)
    if site.prefix:
        set_cache(kwargs, cache_argument(site.model), prefix_cache(site, batch))
        mask = ones_before(mask, batch, site.tokens)
        return site.model(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    if embeds is None:
        embeds = site.embed(input_ids)
    embeds, mask, labels = prepend(site.adapter.table(), embeds, mask, kwargs.pop("labels", None))
    return site.model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)


@contextmanager
def generation_override(model: nn.Module, prepare: Callable[..., ModelInputs]) -> Iterator[None]:
    """Install ``prepare`` as ``model.prepare_inputs_for_generation`` for the duration of the block."""
    original_own = model.__dict__.get("prepare_inputs_for_generation")
    target = generating(model)
    target.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if original_own is not None:
            target.prepare_inputs_for_generation = original_own
        else:
            del target.prepare_inputs_for_generation


def is_prefill(kwargs: ModelInputs, cache: Cache | None) -> bool:
    """Whether a generation step is the first (``is_first_iteration`` where transformers passes it, else an empty
    cache, as HF PEFT decides)."""
    first = kwargs.get("is_first_iteration")
    if first is not None:
        return bool(first)
    return cache is None or cache.get_seq_length() == 0


@contextmanager
def generation_inputs(site: PromptSite) -> Iterator[None]:
    """Override ``site.model.prepare_inputs_for_generation`` for the duration of one ``generate`` call.

    On the first step prefix tuning puts its cache in place of the empty one (under whichever name the model's
    inputs use) and prompt tuning feeds [P; embed(ids)]; on every step the 2-D attention mask gets T leading ones
    and prefix tuning's position ids are shifted by T.
    """
    check_decoder_only(site.adapter)
    model = site.model
    original = generating(model).prepare_inputs_for_generation
    t, prefix = site.tokens, site.prefix

    def prepare(*args: Any, **kwargs: Any) -> ModelInputs:
        inputs = original(*args, **kwargs)
        key = next((k for k in CACHE_ARGUMENTS if k in inputs), cache_argument(model))
        cache = inputs.get(key)
        first = is_prefill(kwargs, cache)
        ids = inputs["input_ids"]
        cached = 0 if cache is None else cache.get_seq_length()
        if cached > 0 and cached >= ids.shape[1]:
            ids = inputs["input_ids"] = ids[:, -1:]  # the cache is longer than the ids: feed the last token
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise PeftdeclError("prompt-learning generation needs a 2-D attention mask")
            inputs["attention_mask"] = ones_before(mask, ids.shape[0], t)
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + t if prefix else None
        if first:
            if prefix:
                set_cache(inputs, key, prefix_cache(site, ids.shape[0]))
            else:
                inputs["inputs_embeds"] = prepend(site.adapter.table(), site.embed(ids), None, None)[0]
                inputs["input_ids"] = None
        position = inputs.get("cache_position")  # transformers < 5 only
        if position is not None:
            if prefix and first:
                inputs["cache_position"] = position + t
            elif not prefix:
                inputs.pop("cache_position")  # the model derives it from the (longer) embeddings
        return inputs

    with generation_override(model, prepare):
        yield
