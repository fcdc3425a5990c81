"""Feeding a prompt-learning adapter to a model with a task head, as HF PEFT's SEQ_CLS, TOKEN_CLS and QUESTION_ANS
wrappers do.

For all three the attention mask gets T leading ones and the targets (``labels``; ``start_positions`` and
``end_positions``) reach the model unchanged. Prompt tuning runs the model on [P; embed(ids)], so a token
classifier's logits, and a QA head's start and end logits, cover T + S positions with the T virtual ones first
(PEFT does not cut them off): token-classification labels must be (B, T + S), and QA positions index that longer
sequence (position p < T names a virtual token). Token type ids get T leading zeros; PEFT's QA wrapper never passes
token type ids or position ids on, so QA drops them. Prefix tuning hands its KV cache to the model itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch

from peftdecl.errors import PeftdeclError
from peftdecl_torch.kinds.prompt import prepend
from peftdecl_torch.prompting import (
    ModelInputs,
    PromptCall,
    PromptSite,
    accepts_cache,
    adjust_ids,
    cache_argument,
    check_decoder_only,
    ones_before,
    prefix_cache,
    set_cache,
    split_inputs,
)

HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
"""The task types whose prompt-learning inputs follow :func:`head_call`."""
PEFT_CACHE_ARGUMENT = "past_key_values"
"""The argument name HF PEFT 0.21.2 looks for in the model's forward before it hands over a prefix (TOKEN_CLS and
QUESTION_ANS)."""


def head_rules(task: str) -> PromptCall:
    """:func:`head_call` for ``task``, with the signature of the other prompt calls."""
    if task not in HEAD_TASKS:
        raise PeftdeclError(f"task_type {task} has no task-head rules; these do: {', '.join(HEAD_TASKS)}")
    return partial(head_call, task)


def head_call(task: str, site: PromptSite, args: tuple[object, ...], kwargs: ModelInputs) -> object:
    """``site.model(**inputs)`` with the adapter's virtual tokens added by HF PEFT's rules for ``task``: the mask
    becomes [1_T, mask]; prompt tuning feeds [P; embed(ids)] and token types [0_T, types]; prefix tuning feeds the
    cache."""
    check_decoder_only(site.adapter)
    kwargs, input_ids, embeds, batch = split_inputs(args, kwargs)
    t = site.tokens
    mask = ones_before(kwargs.pop("attention_mask", None), batch, t)
    if task == "QUESTION_ANS":
        # PEFT's QA wrapper takes both by name and never hands them to the model
        kwargs.pop("token_type_ids", None)
        kwargs.pop("position_ids", None)
    types = kwargs.pop("token_type_ids", None)  # kept, unlike in the language-model rules
    adjust_ids(site.adapter, kwargs)
    if site.prefix:
        check_prefix(task, site.model)
        set_cache(kwargs, cache_argument(site.model), prefix_cache(site, batch))
        if types is not None:
            kwargs["token_type_ids"] = types
        return site.model(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)
    if embeds is None:
        embeds = site.embed(input_ids)
    if task == "TOKEN_CLS":
        check_token_labels(kwargs.get("labels"), t, int(embeds.shape[1]))
    if types is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, t), types], dim=1)
    embeds = prepend(site.adapter.table(), embeds, None, None)[0]
    return site.model(inputs_embeds=embeds, attention_mask=mask, **kwargs)


def check_prefix(task: str, model: Callable[..., object]) -> None:
    """Refuse prefix tuning where HF PEFT refuses it. SEQ_CLS: a forward that takes no KV cache under any name.
    TOKEN_CLS and QUESTION_ANS: a forward without a ``past_key_values`` argument, the only name PEFT hands the
    prefix under (transformers 5 calls the cache ``cache``, so PEFT refuses these tasks on every model there)."""
    name = type(model).__name__
    if task == "SEQ_CLS":
        if not accepts_cache(model):
            raise PeftdeclError(
                f"prefix tuning needs a model whose forward takes a KV cache; {name} takes none "
                "(HF PEFT refuses it too): use prompt tuning or LoRA-style adapters"
            )
        return
    if PEFT_CACHE_ARGUMENT in forward_parameters(model):
        return
    why = (
        "its KV cache argument is named 'cache' (transformers 5)"
        if accepts_cache(model)
        else "it takes no KV cache (encoders such as BERT have none)"
    )
    raise PeftdeclError(
        f"prefix tuning with task_type {task} on {name}: HF PEFT hands the prefix to the model as "
        f"{PEFT_CACHE_ARGUMENT}, which {name}.forward does not take ({why}), so PEFT refuses this model and there "
        "is no behaviour to match; use prompt tuning or a LoRA-style adapter"
    )


def check_token_labels(labels: object, t: int, length: int) -> None:
    """Token-classification labels must cover the T virtual positions the logits keep (PEFT fails on S columns
    with a bare shape mismatch)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.shape[1] == t + length:
        return
    raise PeftdeclError(
        f"task_type TOKEN_CLS with prompt tuning: the logits cover {t} virtual + {length} input positions, the "
        f"virtual ones first (HF PEFT keeps them), so labels must be (batch, {t + length}) with -100 in the first "
        f"{t} columns; got labels of shape {tuple(labels.shape)}"
    )


def forward_parameters(model: Callable[..., object]) -> tuple[str, ...]:
    """The argument names of ``model``'s forward (empty where they cannot be read)."""
    try:
        return tuple(inspect.signature(getattr(model, "forward", model)).parameters)
    except (TypeError, ValueError):
        return ()
