"""Prefix tuning (Li & Liang, 2021) and prompt tuning (Lester et al., 2021) on torch: learned virtual tokens.

P = tanh(E W₀ᵀ + b₀) W₂ᵀ + b₂ (prefix_projection while training) or the learned table itself.
Prefix tuning: layer l attends over [K_l; K] and [V_l; V], K_l = P[:, slot 2l], V_l = P[:, slot 2l+1] split into
heads (PEFT's view (B, T, 2L, H, D), permuted to (2L, B, H, T, D)), handed to the model as its KV cache.
Prompt tuning: the model runs on [P; embed(ids)], the mask gets T leading ones and the labels T leading −100.
No layer is touched, so there is nothing to merge.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from peftdecl.plan import ParamSpec, PromptPlan

IGNORE_INDEX = -100
"""The label of a virtual token: ignored by the loss, as in HF PEFT and transformers."""


class PromptOps:
    """Marks the prompt-learning kinds: nothing per layer, not additive, not mergeable (their model-level ops are
    :class:`PromptAdapter` and :mod:`peftdecl_torch.prompting`, not a :class:`peftdecl.backend.KindOps`)."""

    kind = "prompt"
    additive = False


OPS = PromptOps()


class PromptAdapter(nn.Module):
    """One adapter's virtual-token tensors, stored under their plan names (dots become underscores)."""

    def __init__(
        self,
        pp: PromptPlan,
        specs: tuple[ParamSpec, ...],
        arrays: Mapping[str, np.ndarray],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.plan = pp
        self.names = {spec.name: spec.name.replace(".", "_") for spec in specs}
        self.values = nn.ParameterDict(
            {
                attr: nn.Parameter(
                    torch.tensor(np.asarray(arrays[name])).to(device, dtype),  # a copy of the caller's array
                    requires_grad=False,
                )
                for name, attr in self.names.items()
            }
        )

    def tensors(self) -> dict[str, nn.Parameter]:
        return {name: self.values[attr] for name, attr in self.names.items()}

    def table(self) -> torch.Tensor:
        """P, through the projection MLP when the adapter trains one."""
        p = self.tensors()
        if "prompt_embeddings" in p:
            return p["prompt_embeddings"]
        hidden = torch.tanh(
            nn.functional.linear(p["embedding.weight"], p["transform.0.weight"], p["transform.0.bias"])
        )
        return nn.functional.linear(hidden, p["transform.2.weight"], p["transform.2.bias"])


def key_values(pp: PromptPlan, prefix: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (K, V), each (B, H, T, D) from P ∈ R^{T×2L·d}; with two transformer submodules the slots are
    doubled and cut in groups of four (K, V, K_cross, V_cross), as HF PEFT does."""
    heads = pp.num_attention_heads
    slots = prefix.reshape(pp.num_virtual_tokens, 2 * pp.num_layers, heads, pp.token_dim // heads)
    if pp.num_transformer_submodules == 2:
        slots = torch.cat([slots, slots], dim=1)
    by_slot = slots.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (slots, B, H, T, D)
    group = 2 * pp.num_transformer_submodules
    return [tuple(by_slot[i + j] for j in range(group)) for i in range(0, by_slot.shape[0], group)]


def prepend(
    prompt: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """([P; X], [1_T, mask], [−100_T, labels]) for X (B, S, d)."""
    batch, t = embeds.shape[0], prompt.shape[0]
    rows = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    embeds = torch.cat([rows, embeds], dim=1)
    if mask is not None:
        mask = torch.cat([mask.new_ones(batch, t), mask], dim=1)
    if labels is not None:
        labels = torch.cat([labels.new_full((batch, t), IGNORE_INDEX), labels], dim=1)
    return embeds, mask, labels
