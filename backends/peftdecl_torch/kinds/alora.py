"""Activated LoRA on torch: y = W x + b + m ⊙ s · B A dropout(x), m_t = 1 from the row's invocation tokens on
(peftdecl.alora), 0 elsewhere; :func:`invocation_rows` sets the call's offsets from its ``input_ids``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from peftdecl.adapter_book import AdapterBook
from peftdecl.alora import invocation_offsets, invocation_offsets_set, token_mask
from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds._additive import Params
from peftdecl_torch.kinds.lora import LoraOps
from peftdecl_torch.mixed_batch import ADAPTER_NAMES

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


def _input_ids(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    found = kwargs.get("input_ids")
    if found is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        found = args[0]
    if isinstance(found, torch.Tensor) and found.ndim == 1:
        found = found.unsqueeze(0)
    return found if isinstance(found, torch.Tensor) else None


@contextmanager
def invocation_rows(book: AdapterBook, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterator[None]:
    """For a model call (forward or generate): the offsets of each aLoRA adapter that runs (the active ones, or
    those a mixed batch names) in the call's ``input_ids``; without input_ids (inputs_embeds only) no offsets are
    set, so no aLoRA adapter acts, as in HF PEFT. In a mixed batch each invocation's offsets cover the rows of its
    adapters only, in order: the rows a layer hands that adapter."""
    mixed = ADAPTER_NAMES.get()
    names = mixed.names if mixed is not None else book.active
    tokens_of = {name: tokens for name in dict.fromkeys(names) if (tokens := invocation_tokens(book, name))}
    ids = _input_ids(args, kwargs)
    if not tokens_of or ids is None:
        yield
        return
    input_ids = ids.cpu().numpy()
    if mixed is not None and len(mixed.names) != input_ids.shape[0]:
        raise PeftdeclError(
            f"adapter_names has {len(mixed.names)} entries for input_ids of batch size {input_ids.shape[0]}"
        )
    offsets = {}
    for tokens in dict.fromkeys(tokens_of.values()):
        rows = [i for i, name in enumerate(names) if tokens_of.get(name) == tokens] if mixed else slice(None)
        offsets[tokens] = invocation_offsets(input_ids[rows], tokens)
    with invocation_offsets_set(offsets):
        yield


def invocation_tokens(book: AdapterBook, name: str) -> tuple[int, ...]:
    """The invocation tokens of adapter ``name`` where it is an aLoRA adapter, else ()."""
    plan = book.plans.get(name)
    if plan is None or not plan.layers or plan.layers[0].kind != "alora":
        return ()
    return tuple(plan.layers[0].options["invocation_tokens"])


class AloraOps(LoraOps):
    """LoRA's Δ(x) masked to the positions from the invocation on; never fused, never merged."""

    kind = "alora"
    half_compute = False

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        return self.unfused(lp, layer, p, x)

    def _apply(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor | None
    ) -> torch.Tensor:
        delta = super()._apply(lp, layer, p, x, None)
        batch, length = x.shape[0], (x.shape[1] if x.ndim == 3 else 1)
        mask = token_mask(tuple(lp.options["invocation_tokens"]), batch, length, lp.module)
        m = torch.as_tensor(mask, device=delta.device, dtype=delta.dtype)
        delta = delta * (m[..., None] if x.ndim == 3 else m)
        return delta if result is None else result + delta

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        refuse_merge(lp)

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        refuse_merge(lp)


def refuse_merge(lp: LayerPlan) -> NoReturn:
    raise PeftdeclError(
        f"{lp.module}: an aLoRA adapter cannot be merged: it acts only from the invocation tokens on (as in HF PEFT)"
    )


OPS = AloraOps()
