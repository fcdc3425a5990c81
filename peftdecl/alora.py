"""Activated LoRA (aLoRA, HF PEFT's ``alora_invocation_tokens``): the adapter acts only from the last occurrence of
its invocation token sequence in each row of ``input_ids`` to the end of the row.

A model call that knows ``input_ids`` sets, for the call's duration, each active aLoRA adapter's offsets: o_i =
T − (start of the last invocation in row i), or None where row i has none. A layer then adds s·B A x only at the
last min(o_i, T) positions of its own input length T (no position where o_i is None or no call set offsets), so
during cached generation every new token (T = 1) is adapted and the prompt before the invocation never is.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

from peftdecl.errors import PeftdeclError

Offsets = tuple[int | None, ...]

OFFSETS: contextvars.ContextVar[Mapping[tuple[int, ...], Offsets] | None] = contextvars.ContextVar(
    "peftdecl_alora_offsets", default=None
)
"""Invocation tokens -> the offsets of each row, for the model call in progress (None outside one)."""


def invocation_offsets(input_ids: np.ndarray, tokens: Sequence[int]) -> Offsets:
    """Per row of ``input_ids`` [batch, T]: T − the start of the last full occurrence of ``tokens``, or None."""
    needle = np.asarray(tokens)
    n = len(needle)
    found: list[int | None] = []
    for row in np.atleast_2d(np.asarray(input_ids)):
        starts = [i for i in range(len(row) - n + 1) if np.array_equal(row[i : i + n], needle)]
        found.append(len(row) - starts[-1] if starts else None)
    return tuple(found)


@contextmanager
def invocation_offsets_set(offsets: Mapping[tuple[int, ...], Offsets] | None) -> Iterator[None]:
    """Within the block, aLoRA layers read ``offsets`` (None: nothing is set and no aLoRA adapter acts)."""
    token = OFFSETS.set(offsets)
    try:
        yield
    finally:
        OFFSETS.reset(token)


def token_mask(tokens: tuple[int, ...], batch: int, length: int, module: str) -> np.ndarray:
    """[batch, length] booleans: True where the aLoRA adapter with these invocation ``tokens`` acts. A batch k
    times the number of rows offsets were found for (beam search, several sequences per prompt) repeats each row's
    offset k times, as generation repeats the rows."""
    mask = np.zeros((batch, length), dtype=bool)
    offsets = (OFFSETS.get() or {}).get(tokens)
    if offsets is None:
        return mask
    rows = len(offsets)
    if batch != rows:
        if not rows or batch % rows:
            raise PeftdeclError(
                f"{module}: aLoRA offsets were found for {rows} rows of input_ids, the layer's input has {batch}"
            )
        offsets = tuple(o for o in offsets for _ in range(batch // rows))
    for i, offset in enumerate(offsets):
        if offset is not None:
            mask[i, length - min(offset, length) :] = True
    return mask
