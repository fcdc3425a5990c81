"""Trainable tokens on torch: the chosen rows t of the weight are replaced by the trained rows d.

Alone, the layer runs on W' = W with rows t set to d (``index_copy``, as HF PEFT): an embedding looks x up in W',
a linear layer (a tied output head) computes W' x + b. With other adapters, or per batch row, it contributes
Δ(x) = base with D instead of W, D = d − W[t] on rows t and zero elsewhere. Merging writes the rows and keeps the
old ones for the unmerge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer

Params = dict[str, torch.Tensor]
ROWS = "token_rows"  # the merge cache's copy of the rows a merge overwrote


def token_index(lp: LayerPlan, device: torch.device) -> torch.Tensor:
    return torch.tensor(lp.options["token_indices"], dtype=torch.long, device=device)


def _apply(lp: LayerPlan, layer: AdaptedLayer, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base operation with ``weight`` (IR layout): a lookup, or a linear map with the base's bias."""
    if lp.layer.type == "embedding":
        return layer.embed(x, weight)
    return F.linear(x, weight, None if layer.bias is None else layer.bias.to(weight.dtype))


class TrainableTokensOps:
    """Trainable tokens' :class:`peftdecl.backend.AdditiveOps`."""

    kind = "trainable_tokens"
    additive = True

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        """The base layer on W with rows t replaced by d."""
        weight = layer.weight_ir()
        index = token_index(lp, weight.device)
        replaced = weight.index_copy(0, index, p[lp.options["tensor"]].to(weight.dtype))
        return _apply(lp, layer, replaced, x)

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        """Δ(x): the base operation on D (no bias), D zero but on rows t, where it is d − W[t]."""
        d = self.delta_weight(lp, layer, p)
        if lp.layer.type == "embedding":
            return layer.embed(x, d)
        return F.linear(x.to(d.dtype), d)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        new_rows = p[lp.options["tensor"]]
        weight = layer.weight_ir()
        index = token_index(lp, weight.device)
        change = new_rows - weight.index_select(0, index).to(new_rows.dtype)
        return torch.zeros(weight.shape, dtype=new_rows.dtype, device=weight.device).index_copy(
            0, index, change
        )

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = layer.weight_ir()
        if lp.options.get("tied_to"):
            return weight, None  # a tied head shares the embeddings' table, which their own merge writes
        index = token_index(lp, weight.device)
        cache[ROWS] = weight.index_select(0, index).clone()
        return weight.index_copy(0, index, p[lp.options["tensor"]].to(weight.dtype)), None

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = layer.weight_ir()
        if lp.options.get("tied_to"):
            return weight, None
        if ROWS not in cache:
            raise PeftdeclError(f"{lp.module}: the rows this merge overwrote were not kept; cannot unmerge")
        return weight.index_copy(0, token_index(lp, weight.device), cache.pop(ROWS)), None


OPS = TrainableTokensOps()
