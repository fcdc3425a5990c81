"""Activated LoRA on MLX: y = W x + b + m ⊙ s · B A dropout(x), m_t = 1 from the row's invocation tokens on
(:mod:`peftdecl.alora`), 0 before them and wherever the call set no offsets. Not mergeable.

:func:`invocation_rows` sets a model call's offsets from its token ids, as the torch engine does, computed on the
device (so a compiled training step finds each batch's own). A call with an
mlx-lm KV cache (``cache=``, step-by-step generation) remembers, per cache, where each row's last invocation starts:
a later chunk without an invocation of its own (a generated token) continues from it, as HF PEFT's ``generate``
keeps the prompt's offsets for every new token.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import mlx.core as mx

from peftdecl.adapter_book import AdapterBook
from peftdecl.alora import token_mask
from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan
from peftdecl_mlx.kinds._additive import MergeCache, Params
from peftdecl_mlx.kinds.lora import LoraOps

if TYPE_CHECKING:
    from peftdecl_mlx.layer import AdaptedLayer

DEVICE_OFFSETS: contextvars.ContextVar[Mapping[tuple[int, ...], mx.array] | None] = contextvars.ContextVar(
    "peftdecl_mlx_alora_offsets", default=None
)
"""Invocation tokens -> the rows' offsets [rows] (int32, 0 where a row has none: no position acts), as MLX arrays,
for the model call in progress: computed on the device, so that a compiled training step finds each batch's own."""

_STARTS: weakref.WeakKeyDictionary[object, dict[tuple[int, ...], mx.array]] = weakref.WeakKeyDictionary()
"""The first layer cache of a generation -> invocation tokens -> each row's absolute invocation start (−1: none)."""


def _input_ids(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> mx.array | None:
    found = kwargs.get("input_ids", kwargs.get("inputs"))
    if found is None and args:
        found = args[0]
    if not isinstance(found, mx.array) or not mx.issubdtype(found.dtype, mx.integer):
        return (
            None  # embeddings (or nothing): no invocation to find, so no aLoRA adapter acts (HF PEFT's rule)
        )
    return found[None] if found.ndim == 1 else found


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


def last_invocation(ids: mx.array, tokens: tuple[int, ...]) -> mx.array:
    """[rows]: where the last full occurrence of ``tokens`` starts in each row of ``ids`` [rows, T], −1 where none
    (the rule of :func:`peftdecl.alora.invocation_offsets`, on the device)."""
    rows, length = ids.shape
    width = length - len(tokens) + 1
    if width <= 0:
        return mx.full((rows,), -1, dtype=mx.int32)
    match = mx.ones((rows, width), dtype=mx.bool_)
    for k, token in enumerate(tokens):
        match = match & (ids[:, k : k + width] == token)
    return mx.max(mx.where(match, mx.arange(width, dtype=mx.int32)[None, :], -1), axis=1)


def _chunk_offsets(
    ids: mx.array, tokens: tuple[int, ...], cached: int, remembered: mx.array | None
) -> tuple[mx.array, mx.array]:
    """(offsets from the chunk's end, 0 where none; absolute starts, −1 where none): a row's own invocation in the
    chunk wins, else the one remembered for its cache (a chunk of T tokens after ``cached`` ones ends at
    cached + T)."""
    end = cached + ids.shape[1]
    found = last_invocation(ids, tokens)
    before = remembered if remembered is not None and remembered.shape == found.shape else -1
    starts = mx.where(found >= 0, found + cached, before)
    return mx.where(starts >= 0, end - starts, 0).astype(mx.int32), starts


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
        chunk = ids if rows is None else ids[mx.array(rows)]
        offsets[tokens], starts[tokens] = _chunk_offsets(chunk, tokens, cached, remembered.get(tokens))
    if cache is not None:
        _STARTS[cache] = starts
    token = DEVICE_OFFSETS.set(offsets)
    try:
        yield
    finally:
        DEVICE_OFFSETS.reset(token)


def position_mask(lp: LayerPlan, batch: int, length: int) -> mx.array:
    """[batch, length]: True from each row's invocation on. The engine's offsets of the call where it set them,
    else :func:`peftdecl.alora.token_mask` (offsets set by ``invocation_offsets_set``; none: no position). A batch
    k times the offsets' rows repeats each row's offset k times, as generation repeats the rows."""
    tokens = tuple(lp.options["invocation_tokens"])
    offsets = (DEVICE_OFFSETS.get() or {}).get(tokens)
    if offsets is None:
        return mx.array(token_mask(tokens, batch, length, lp.module))
    rows = offsets.shape[0]
    if batch != rows:
        if not rows or batch % rows:
            raise PeftdeclError(
                f"{lp.module}: aLoRA offsets were found for {rows} rows of input_ids, the layer's input has {batch}"
            )
        offsets = mx.repeat(offsets, batch // rows)
    return mx.arange(length)[None, :] >= (length - offsets)[:, None]


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
        mask = position_mask(lp, x.shape[0], x.shape[1] if x.ndim == 3 else 1).astype(delta.dtype)
        return delta * (mask[..., None] if x.ndim == 3 else mask)

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        refuse_merge(lp)

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: MergeCache
    ) -> tuple[mx.array, mx.array | None]:
        refuse_merge(lp)


OPS = AloraOps()
