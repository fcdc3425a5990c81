"""Prefix tuning (Li & Liang, 2021) and prompt tuning (Lester et al., 2021): learned virtual tokens.

Prefix tuning: P = tanh(E W₀ᵀ + b₀) W₂ᵀ + b₂ (with prefix_projection) or P learned directly, P ∈ R^{T×2L·d};
layer l attends over [K_l; K] and [V_l; V] with K_l = P[:, slot 2l], V_l = P[:, slot 2l+1], split into heads.
Prompt tuning: the model runs on [P; embed(ids)], the mask gets T leading ones and the labels T leading −100.

Neither touches a layer's weights: there is no per-layer forward and nothing to merge.
"""

from __future__ import annotations

from peftdecl.plan import PromptPlan
from peftdecl_numpy.xp_ops import Array, namespace

IGNORE_INDEX = -100
"""The label of a virtual token: ignored by the loss, as in HF PEFT and transformers."""

Params = dict[str, Array]


class PromptOps:
    """Marks the prompt-learning kinds: nothing per layer, not additive, not mergeable."""

    kind = "prompt"
    additive = False


OPS = PromptOps()


def table(pp: PromptPlan, p: Params) -> tuple[Array, dict[str, Array]]:
    """(P, cache): the virtual-token table, through the projection MLP when the adapter trains one."""
    if "prompt_embeddings" in p:
        return p["prompt_embeddings"], {}
    e = p["embedding.weight"]
    hidden = namespace(e).tanh(e @ p["transform.0.weight"].T + p["transform.0.bias"])
    return hidden @ p["transform.2.weight"].T + p["transform.2.bias"], {"hidden": hidden}


def table_backward(pp: PromptPlan, p: Params, cache: dict[str, Array], d_table: Array) -> Params:
    """dL/d(trainable tensors) from dL/dP."""
    if "prompt_embeddings" in p:
        return {"prompt_embeddings": d_table}
    xp = namespace(d_table)
    hidden = cache["hidden"]
    d_pre = (d_table @ p["transform.2.weight"]) * (1.0 - hidden**2)  # through tanh
    return {
        "transform.2.weight": d_table.T @ hidden,
        "transform.2.bias": xp.sum(d_table, axis=0),
        "transform.0.weight": d_pre.T @ p["embedding.weight"],
        "transform.0.bias": xp.sum(d_pre, axis=0),
        "embedding.weight": d_pre @ p["transform.0.weight"],
    }


def key_values(pp: PromptPlan, prefix: Array, batch_size: int) -> list[tuple[Array, ...]]:
    """Per layer (K, V), each (B, H, T, D), from P ∈ R^{T×2L·d}: PEFT's view (B, T, 2L, H, D) and permute
    (2, 0, 3, 1, 4), so P[t, ((2l + kv)·H + h)·D + i] = (K if kv == 0 else V)[b, h, t, i] of layer l.

    With two transformer submodules (encoder-decoder) PEFT doubles the slots to 4L and cuts groups of four,
    so layer l gets slots 4l … 4l+3 taken modulo 2L: (K, V, K_cross, V_cross) — and its EncoderDecoderCache
    then keeps the first pair for self-attention and empties the cross-attention cache.
    """
    xp = namespace(prefix)
    heads = pp.num_attention_heads
    slots = xp.reshape(prefix, (pp.num_virtual_tokens, 2 * pp.num_layers, heads, pp.token_dim // heads))
    if pp.num_transformer_submodules == 2:
        slots = xp.concat([slots, slots], axis=1)
    by_slot = xp.permute_dims(slots, (1, 2, 0, 3))  # (slots, H, T, D)
    per_slot = xp.broadcast_to(by_slot[:, None, ...], (by_slot.shape[0], batch_size, *by_slot.shape[1:]))
    group = 2 * pp.num_transformer_submodules
    return [tuple(per_slot[i + j, ...] for j in range(group)) for i in range(0, per_slot.shape[0], group)]


def key_values_backward(pp: PromptPlan, d_kv: list[tuple[Array, ...]]) -> Array:
    """dL/dP from the gradients of every layer's (K, V, ...) (summed over the batch and duplicated slots)."""
    xp = namespace(d_kv[0][0])
    heads, dim = pp.num_attention_heads, pp.token_dim // pp.num_attention_heads
    per_slot = xp.stack([xp.sum(g, axis=0) for group in d_kv for g in group])  # (slots, H, T, D)
    slots = 2 * pp.num_layers
    if pp.num_transformer_submodules == 2:
        per_slot = per_slot[:slots, ...] + per_slot[slots:, ...]
    return xp.reshape(xp.permute_dims(per_slot, (2, 0, 1, 3)), (pp.num_virtual_tokens, slots * heads * dim))


def prepend_virtual_tokens(
    prompt: Array,
    inputs_embeds: Array,
    attention_mask: Array | None = None,
    labels: Array | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """PEFT's causal-LM prompt tuning input: ([P; X], [1_T, mask], [−100_T, labels]) for X (B, S, d).

    The model's logits then cover T + S positions; those of the real tokens are ``logits[:, T:]``.
    (Encoder-decoder: the encoder gets ``prompt[:T]``, the decoder ``prompt[T:]``.)
    """
    xp = namespace(prompt, inputs_embeds)
    batch, t = inputs_embeds.shape[0], prompt.shape[0]
    embeds = xp.concat([xp.broadcast_to(prompt, (batch, *prompt.shape)), inputs_embeds], axis=1)
    mask = (
        None
        if attention_mask is None
        else xp.concat([xp.ones((batch, t), dtype=attention_mask.dtype), attention_mask], axis=1)
    )
    labels_out = (
        None
        if labels is None
        else xp.concat([xp.full((batch, t), IGNORE_INDEX, dtype=labels.dtype), labels], axis=1)
    )
    return embeds, mask, labels_out


def prepend_backward(d_embeds: Array, num_prompt_rows: int) -> tuple[Array, Array]:
    """(dL/dP, dL/dX) from dL/d[P; X]: the prompt rows' gradients summed over the batch."""
    xp = namespace(d_embeds)
    return xp.sum(d_embeds[:, :num_prompt_rows, ...], axis=0), d_embeds[:, num_prompt_rows:, ...]
