"""Mixed batches on the torch backend: one adapter per batch row (``adapter_names=``), as in HF PEFT.

The engine checks the names and sets them in a context variable for the duration of the call (reset when the call
ends, whether it returns or raises); each wrapper reads them there and runs each row through its own adapter.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import BASE_ROW as BASE
from peftdecl.backend import check_adapter_names
from peftdecl.errors import PeftdeclError
from peftdecl_torch.kinds import ops_for


@dataclass(frozen=True)
class RowAdapters:
    """One adapter name per batch row for the call in progress. ``expand``: generation may have repeated each
    row (beam search, several return sequences), so a batch k times longer repeats each name k times."""

    names: tuple[str, ...]
    expand: bool = False

    def for_batch(self, batch: int, module: str) -> tuple[str, ...]:
        n = len(self.names)
        if batch == n:
            return self.names
        if self.expand and n and batch % n == 0:
            return tuple(name for name in self.names for _ in range(batch // n))
        raise PeftdeclError(f"{module}: adapter_names has {n} entries for an input of batch size {batch}")


ADAPTER_NAMES: contextvars.ContextVar[RowAdapters | None] = contextvars.ContextVar(
    "peftdecl_torch_adapter_names", default=None
)
"""The per-row adapters of the mixed-batch call in progress (None outside one)."""

_IN_PROGRESS = [0]  # mixed-batch calls in progress in any thread, under _COUNT_LOCK
_COUNT_LOCK = threading.Lock()


def current_rows() -> RowAdapters | None:
    """:data:`ADAPTER_NAMES` of this context, read only while some thread runs a mixed batch: dynamo cannot trace
    ``ContextVar.get`` (a graph break per layer) but guards on the plain count, so a compiled model outside mixed
    batches never reads the variable."""
    return ADAPTER_NAMES.get() if _IN_PROGRESS[0] else None


@contextmanager
def mixed_rows(
    adapter_names: Sequence[str] | None, book: AdapterBook, prompts: Collection[str], expand: bool
) -> Iterator[None]:
    """Within the block, every wrapper runs row i through adapter ``adapter_names[i]`` (None: no mixed batch);
    ``prompts``: the prompt-learning adapters, which cannot take part."""
    if adapter_names is None:
        yield
        return
    token = ADAPTER_NAMES.set(RowAdapters(check_rows(adapter_names, book, prompts), expand))
    with _COUNT_LOCK:
        _IN_PROGRESS[0] += 1
    try:
        yield
    finally:
        with _COUNT_LOCK:
            _IN_PROGRESS[0] -= 1
        ADAPTER_NAMES.reset(token)


def check_rows(adapter_names: Sequence[str], book: AdapterBook, prompts: Collection[str]) -> tuple[str, ...]:
    """``adapter_names`` as a tuple, refused (PeftdeclError) unless each names an attached additive layer adapter
    or :data:`BASE` and nothing is merged."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise PeftdeclError("adapter_names must be a list of adapter names, one per batch row")
    names = tuple(adapter_names)
    check_adapter_names(names, book.plans, merged=bool(book.merged))
    for name in dict.fromkeys(names):
        if name == BASE:
            continue
        if name in prompts:
            raise PeftdeclError(
                f"adapter {name!r} is {book.plans[name].kind}; mixed batches take layer adapters"
            )
        for kind in {lp.kind for lp in book.plans[name].layers}:
            if not ops_for(kind).additive:
                raise PeftdeclError(
                    f"adapter {name!r} is {kind}; mixed batches (adapter_names) support the additive kinds "
                    "LoRA, AdaLoRA, LoHa, LoKr and VeRA only (HF PEFT also rejects DoRA here)"
                )
    return names
