"""Prompt-learning adapters on a transformers encoder-decoder model (T5 and the like), as HF PEFT's
``PeftModelForSeq2SeqLM`` runs them (``num_transformer_submodules`` = 2 for prefix tuning).

Prefix tuning: PEFT views P ∈ R^{T×2L·d} as 2L slots, doubles them to 4L and cuts groups of four, so layer l gets
slots 4l … 4l+3 taken modulo 2L: (K, V, K_cross, V_cross). The first pair seeds the decoder self-attention cache of
an ``EncoderDecoderCache``; its cross-attention part is left empty (the model fills it from the encoder output), so
only the decoder's self-attention sees a prefix: at layer l, K from slot 4l mod 2L and V from the next one (for
L = 2 both layers get slots 0 and 1). The decoder attention mask (when given) gets T leading ones; the encoder
inputs, its mask and the labels are unchanged, and the logits cover the decoder tokens only.

Prompt tuning: the encoder runs on [P[:T]; embed(ids)] and its attention mask gets T leading ones. The decoder,
its mask and the labels are untouched; the table's other T rows (PEFT's decoder half) are saved but not used.

``generate``: prompt tuning hands the encoder the same embeddings; prefix tuning swaps its cache in on the first
step. Unlike HF PEFT 0.21.2 under transformers 5 (whose override sets ``past_key_values`` beside the model's own
``cache``, which wins, so the prefix is silently dropped), the prefix is in place on the first step: greedy decoding
equals the argmax loop over PEFT's own forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from peftdecl.errors import PeftdeclError
from peftdecl_torch.kinds.prompt import PromptAdapter, key_values, prepend
from peftdecl_torch.prompting import (
    CACHE_ARGUMENTS,
    ModelInputs,
    PromptSite,
    adjust_ids,
    cache_argument,
    generating,
    generation_override,
    is_prefill,
    keyword_inputs,
    ones_before,
    set_cache,
    split_inputs,
)

if TYPE_CHECKING:
    from transformers import EncoderDecoderCache


def _check(adapter: PromptAdapter) -> None:
    if adapter.plan.kind == "prefix_tuning" and adapter.plan.num_transformer_submodules != 2:
        raise PeftdeclError(
            "prefix_tuning on an encoder-decoder model needs num_transformer_submodules = 2 (task_type "
            f"SEQ_2_SEQ_LM), not {adapter.plan.num_transformer_submodules}"
        )


def encoder_decoder_cache(site: PromptSite, batch: int) -> EncoderDecoderCache:
    """An ``EncoderDecoderCache``: each decoder layer's self-attention (K, V) prefix, cross-attention empty."""
    from transformers import DynamicCache, EncoderDecoderCache

    groups = key_values(site.adapter.plan, site.adapter.table().to(site.dtype), batch)
    return EncoderDecoderCache(DynamicCache([(g[0], g[1]) for g in groups]), DynamicCache())


def seq2seq_call(site: PromptSite, args: tuple[object, ...], kwargs: ModelInputs) -> object:
    """``site.model(**inputs)`` with the adapter's virtual tokens added to the inputs (HF PEFT's seq2seq rules)."""
    _check(site.adapter)
    kwargs, input_ids, embeds, batch = split_inputs(args, kwargs)
    adjust_ids(site.adapter, kwargs)
    if site.prefix:
        if kwargs.get("decoder_attention_mask") is not None:
            kwargs["decoder_attention_mask"] = ones_before(
                kwargs["decoder_attention_mask"], batch, site.tokens
            )
        set_cache(kwargs, cache_argument(site.model), encoder_decoder_cache(site, batch))
        return site.model(input_ids=input_ids, inputs_embeds=embeds, **kwargs)
    return site.model(**_encoder_prompt(site, input_ids, embeds, kwargs))


def _encoder_prompt(
    site: PromptSite, input_ids: torch.Tensor | None, embeds: torch.Tensor | None, kwargs: ModelInputs
) -> ModelInputs:
    """``kwargs`` with ``inputs_embeds`` = [P[:T]; X] and the encoder mask extended (prompt tuning)."""
    if embeds is None:
        embeds = site.embed(input_ids)
    table = site.adapter.table()[: site.tokens]
    embeds, mask, _ = prepend(table, embeds, kwargs.pop("attention_mask", None), None)
    return {**kwargs, "inputs_embeds": embeds, "attention_mask": mask}


def seq2seq_generate(site: PromptSite, args: tuple[object, ...], kwargs: ModelInputs) -> object:
    """``site.model.generate(**inputs)`` with the adapter's virtual tokens (HF PEFT's seq2seq ``generate``)."""
    _check(site.adapter)
    model = generating(site.model)
    kwargs = keyword_inputs(args, kwargs)
    if kwargs.get("input_ids") is None:
        raise PeftdeclError("generate with a prompt-learning adapter needs input_ids=...")
    adjust_ids(site.adapter, kwargs)
    if not site.prefix:
        kwargs.pop("encoder_outputs", None)  # HF PEFT ignores them too: the encoder must see the prompt
        return model.generate(**_encoder_prompt(site, kwargs.pop("input_ids"), None, kwargs))
    original = model.prepare_inputs_for_generation

    def prepare(*args: Any, **kwargs: Any) -> ModelInputs:
        inputs = original(*args, **kwargs)
        key = next((k for k in CACHE_ARGUMENTS if k in inputs), cache_argument(site.model))
        if is_prefill(kwargs, inputs.get(key)):
            set_cache(inputs, key, encoder_decoder_cache(site, inputs["decoder_input_ids"].shape[0]))
        return inputs

    with generation_override(site.model, prepare):
        return model.generate(**kwargs)
