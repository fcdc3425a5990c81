"""Activated LoRA on MLX: y = W x + b + m ⊙ s · B A dropout(x), m_t = 1 from the row's invocation tokens on
(:mod:`peftdecl.alora`), 0 before them and wherever the call set no offsets. Not mergeable.

:func:`invocation_rows` sets a model call's offsets from its token ids, as the torch engine does. A call with an
mlx-lm KV cache (``cache=``, step-by-step generation) remembers, per cache, where each row's last invocation starts:
a later chunk without an invocation of its own (a generated token) continues from it, as HF PEFT's ``generate``
keeps the prompt's offsets for every new token.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import mlx.core as mx
import numpy as np

from peftdecl.adapter_book import AdapterBook
from peftdecl.alora import Offsets, invocation_offsets, invocation_offsets_set, token_mask
from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import MergeCache, Params
from peftdecl_mlx.kinds.lora import LoraOps

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer

Starts = tuple[int | None, ...]
"""Per row: the absolute position (cached tokens included) where its last invocation starts, or None."""

_STARTS: weakref.WeakKeyDictionary[object, dict[tuple[int, ...], Starts]] = weakref.WeakKeyDictionary()
"""The first layer cache of a generation -> invocation tokens -> the rows' invocation starts."""


def _input_ids(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> np.ndarray | None:
    found = kwargs.get("input_ids", kwargs.get("inputs"))
    if found is None and args:
        found = args[0]
    if not isinstance(found, mx.array) or not mx.issubdtype(found.dtype, mx.integer):
        return (
            None  # embeddings (or nothing): no invocation to find, so no aLoRA adapter acts (HF PEFT's rule)
        )
    return np.atleast_2d(np.array(found))


def _cache_of(kwargs: Mapping[str, Any]) -> tuple[object | None, int]:
    """(the object a generation's starts are remembered by, the number of tokens already cached)."""
    cache = kwargs.get("cache")
    first = cache[0] if isinstance(cache, Sequence) and cache else None
    offset = getattr(first, "offset", None)
    if first is None or not isinstance(offset, int):
        return None, 0
    return first, offset


def invocation_tokens(book: AdapterBook, name: str) -> tuple[int, ...]:
    """The invocation tokens of adapter ``name`` where it is an aLoRA adapter, else ()."""
    plan = book.plans.get(name)
    if plan is None or not plan.layers or plan.layers[0].kind != "alora":
        return ()
    return tuple(plan.layers[0].options["invocation_tokens"])


def _chunk_offsets(
    input_ids: np.ndarray, tokens: tuple[int, ...], cached: int, remembered: Starts | None
) -> tuple[Offsets, Starts]:
    """(offsets from the chunk's end, absolute starts): a row's own invocation in the chunk wins, else the one
    remembered for its cache (a chunk of T tokens after ``cached`` ones ends at cached + T)."""
    end = cached + input_ids.shape[1]
    starts: list[int | None] = []
    for row, offset in enumerate(invocation_offsets(input_ids, tokens)):
        before = remembered[row] if remembered is not None and row < len(remembered) else None
        starts.append(end - offset if offset is not None else before)
    return tuple(None if s is None else end - s for s in starts), tuple(starts)


@contextmanager
def invocation_rows(
    book: AdapterBook, args: tuple[Any, ...], kwargs: Mapping[str, Any], adapter_names: Sequence[str] | None
) -> Iterator[None]:
    """For one model call: the offsets of each aLoRA adapter that runs (the active ones, or those
    ``adapter_names`` gives the rows; each invocation's offsets then cover its adapters' rows only, in order)."""
    names = tuple(adapter_names) if adapter_names is not None else book.active
    tokens_of = {name: tokens for name in dict.fromkeys(names) if (tokens := invocation_tokens(book, name))}
    ids = _input_ids(args, kwargs) if tokens_of else None
    if ids is None:
        yield
        return
    if adapter_names is not None and len(names) != ids.shape[0]:
        raise PeftdeclError(
            f"adapter_names has {len(names)} entries for input_ids of batch size {ids.shape[0]}"
        )
    cache, cached = _cache_of(kwargs)
    remembered = _STARTS.get(cache, {}) if cache is not None else {}
    offsets, starts = {}, {}
    for tokens in dict.fromkeys(tokens_of.values()):
        rows = (
            [i for i, n in enumerate(names) if tokens_of.get(n) == tokens]
            if adapter_names is not None
            else None
        )
        chunk = ids if rows is None else ids[rows]
        offsets[tokens], starts[tokens] = _chunk_offsets(chunk, tokens, cached, remembered.get(tokens))
    if cache is not None:
        _STARTS[cache] = starts
    with invocation_offsets_set(offsets):
        yield


def refuse_merge(lp: LayerPlan) -> NoReturn:
    raise PeftdeclError(
        f"{lp.module}: an aLoRA adapter cannot be merged: it acts only from the invocation tokens on (as in HF PEFT)"
    )


class AloraOps(LoraOps):
    """LoRA's Δ(x) masked to the positions from the invocation on; never fused, never merged."""

    kind = "alora"

    def alone(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array | None:
        return None  # the fused paths add Δ at every position

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """m ⊙ Δy, m [B, T, 1] for a [B, T, in] input ([B, 1] for [B, in])."""
        delta = super().delta(lp, layer, p, x)
        batch, length = x.shape[0], (x.shape[1] if x.ndim == 3 else 1)
        mask = token_mask(tuple(lp.options["invocation_tokens"]), batch, length, lp.module)
        m = mx.array(mask[..., None] if x.ndim == 3 else mask).astype(delta.dtype)
        return delta * m

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        refuse_merge(lp)

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        refuse_merge(lp)


OPS = AloraOps()
