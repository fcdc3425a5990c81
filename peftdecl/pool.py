"""``AdapterPool``: serve many adapters from one base model, at most K attached at a time (LRU, pinning).

Each call runs a mixed batch, one adapter per row (``model(..., adapter_names=[...])``); the adapters it names are
loaded on first use from a directory or a resolver. Concurrency, in three parts:

- the admission of a batch is atomic: under the bookkeeping condition the batch reserves a slot for every adapter it
  names (evicting least recently used idle, unpinned ones) or reserves nothing and waits, so no two batches can each
  hold part of what the other needs (no deadlock);
- a reserved but absent adapter is read from disk (files -> arrays, validation) by the one batch that reserved it,
  outside every lock; batches naming it meanwhile wait on its slot's event, and a failed read raises in all of them;
- attaching, detaching and forwards are serialised by one model lock; an adapter held by an admitted batch (its
  slot's user count > 0) is never evicted, and an evicted adapter is detached before the next attach, so the model
  never holds more than K pool adapters.

Adapters are inference-only: frozen, the model in eval mode. Adapters already attached to the model when the pool
is made stay usable by name, outside the pool's K slots (never loaded, evicted or counted).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from peftdecl.backend import BASE_ROW, backend_for
from peftdecl.errors import PeftdeclError
from peftdecl.model import AdaptedModel
from peftdecl.names import check_adapter_name
from peftdecl.pool_source import AdapterSource, read_pooled_adapter, resolve_folder


@dataclass(frozen=True)
class PoolStats:
    """Counters since the pool was made. A hit: a batch named a resident adapter; a miss: it had to wait for a load
    (its own or another batch's); ``loads``: folders read; ``load_seconds``: their read + attach time."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    failed_loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


@dataclass(eq=False)
class _Slot:
    """One of the K places: an adapter resident in the model, or being loaded into it."""

    name: str
    users: int = 0
    """Admitted batches holding it (it is not evicted while > 0)."""
    ready: threading.Event = field(default_factory=threading.Event)
    """Set once the load ended, attached or failed (``error``)."""
    error: BaseException | None = None


class AdapterPool:
    """At most ``max_loaded`` adapters from ``source`` attached to ``model`` at once, loaded on first use.

    ``model``: an :class:`~peftdecl.AdaptedModel` or a base model (its backend detected). ``source``: a directory
    whose sub-folders are adapters (name = sub-folder name) or a callable ``name -> folder``."""

    def __init__(self, model: object, max_loaded: int, source: AdapterSource) -> None:
        if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
            raise PeftdeclError(f"AdapterPool: max_loaded must be a positive integer, got {max_loaded!r}")
        if not isinstance(model, AdaptedModel):
            model = AdaptedModel.create(backend_for(model), model)
        self._model: AdaptedModel = model
        self._max = max_loaded
        self._source = source
        self._external = frozenset(model.adapters)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()  # least recently used first
        self._pinned: set[str] = set()
        self._retiring: list[str] = []  # evicted, still attached: detached before the next attach
        self._stats = PoolStats()
        self._cv = (
            threading.Condition()
        )  # guards the bookkeeping above; never held while waiting on the model
        self._model_lock = threading.Lock()  # serialises forwards, attaches and detaches
        model.eval()

    # -- introspection -------------------------------------------------------------------------------------
    @property
    def model(self) -> AdaptedModel:
        return self._model

    @property
    def max_loaded(self) -> int:
        return self._max

    @property
    def loaded(self) -> list[str]:
        """The pool's attached adapters, least recently used first."""
        with self._cv:
            return [n for n, s in self._slots.items() if s.ready.is_set() and s.error is None]

    @property
    def pinned(self) -> frozenset[str]:
        with self._cv:
            return frozenset(self._pinned)

    @property
    def stats(self) -> PoolStats:
        with self._cv:
            return self._stats

    # -- running -------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, adapter_names: Sequence[str], **kwargs: Any) -> Any:
        """``model(*args, adapter_names=..., **kwargs)``: row i through adapter ``adapter_names[i]`` (``"__base__"``:
        none), the adapters loaded first if needed."""
        return self._run("forward", args, adapter_names, kwargs)

    def forward(self, *args: Any, adapter_names: Sequence[str], **kwargs: Any) -> Any:
        return self._run("forward", args, adapter_names, kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str], **kwargs: Any) -> Any:
        """``model.generate(*args, adapter_names=..., **kwargs)``: each row generated with its own adapter."""
        return self._run("generate", args, adapter_names, kwargs)

    def _run(
        self, method: str, args: tuple[Any, ...], adapter_names: Sequence[str], kwargs: dict[str, Any]
    ) -> Any:
        rows = _rows(adapter_names)
        held = self._acquire(n for n in rows if n != BASE_ROW)
        try:
            with self._model_lock:
                return getattr(self._model, method)(*args, adapter_names=list(rows), **kwargs)
        finally:
            self._release(held)

    # -- pinning -------------------------------------------------------------------------------------------
    def pin(self, name: str) -> None:
        """Load ``name`` if needed and keep it attached until :meth:`unpin` (it is never evicted)."""
        with self._cv:
            if name not in self._pinned and len(self._pinned) >= self._max:
                raise PeftdeclError(
                    f"cannot pin {name!r}: all {self._max} slots are pinned ({sorted(self._pinned)})"
                )
        held = self._acquire([name])
        try:
            with self._cv:
                if name in self._external:
                    return
                if name not in self._pinned and len(self._pinned) >= self._max:
                    raise PeftdeclError(
                        f"cannot pin {name!r}: all {self._max} slots are pinned ({sorted(self._pinned)})"
                    )
                self._pinned.add(name)
        finally:
            self._release(held)

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again (least recently used first)."""
        with self._cv:
            if name not in self._pinned:
                raise PeftdeclError(f"adapter {name!r} is not pinned (pinned: {sorted(self._pinned)})")
            self._pinned.discard(name)
            self._cv.notify_all()

    # -- slots ---------------------------------------------------------------------------------------------
    def _acquire(self, names: Iterable[str]) -> list[_Slot]:
        """Reserve (and load where absent) a slot for each distinct name; return the slots, held."""
        wanted = [n for n in dict.fromkeys(names) if n not in self._external]
        for name in wanted:
            check_adapter_name(name)
        held, mine = self._admit(wanted)
        try:
            interrupted: BaseException | None = None
            for slot in mine:  # this batch's own loads first, then waiting: no two loaders wait on each other
                try:
                    self._load(slot)
                except BaseException as exc:  # recorded in the slot; the other loads go on, their waiters too
                    if not isinstance(exc, Exception):
                        interrupted = interrupted or exc
            if interrupted is not None:
                raise interrupted
            for slot in held:  # every caller, loader or waiter, raises the same error for a failed load
                slot.ready.wait()
                if slot.error is not None:
                    raise PeftdeclError(f"adapter {slot.name!r} failed to load: {slot.error}") from slot.error
        except BaseException:
            self._release(held)
            raise
        return held

    def _admit(self, names: list[str]) -> tuple[list[_Slot], list[_Slot]]:
        """Atomically: evict what is needed and reserve every name's slot (waiting until that is possible)."""
        if len(names) > self._max:
            raise PeftdeclError(
                f"a batch names {len(names)} distinct adapters; the pool holds at most max_loaded={self._max}"
            )
        with self._cv:
            while True:
                blocked = self._pinned.difference(names)
                if len(blocked) + len(names) > self._max:
                    raise PeftdeclError(
                        f"a batch names {len(names)} adapters but {len(blocked)} of the {self._max} slots are pinned "
                        f"({sorted(blocked)}); unpin some or raise max_loaded"
                    )
                absent = [n for n in names if n not in self._slots]
                victims = self._victims(len(absent) - (self._max - len(self._slots)), names)
                if victims is not None:
                    break
                self._cv.wait()
            for victim in victims:
                del self._slots[victim]
                self._retiring.append(victim)
            held, mine = [], []
            for name in names:
                slot = self._slots.get(name)
                if slot is None:
                    slot = self._slots[name] = _Slot(name)
                    mine.append(slot)
                self._slots.move_to_end(name)
                slot.users += 1
                held.append(slot)
            hits = sum(1 for s in held if s.ready.is_set() and s not in mine)
            self._stats = replace(
                self._stats,
                hits=self._stats.hits + hits,
                misses=self._stats.misses + len(held) - hits,
                evictions=self._stats.evictions + len(victims),
            )
            return held, mine

    def _victims(self, needed: int, keep: Sequence[str]) -> list[str] | None:
        """The ``needed`` least recently used idle, unpinned, attached adapters outside ``keep`` (None: too few)."""
        if needed <= 0:
            return []
        idle = [
            n
            for n, s in self._slots.items()
            if s.users == 0 and s.ready.is_set() and n not in self._pinned and n not in keep
        ]
        return idle[:needed] if len(idle) >= needed else None

    def _load(self, slot: _Slot) -> None:
        """Read ``slot``'s adapter outside every lock, then attach it (frozen) under the model lock."""
        start = time.perf_counter()
        try:
            pooled = read_pooled_adapter(self._model, slot.name, resolve_folder(self._source, slot.name))
        except BaseException as exc:
            self._fail(slot, exc)
            raise
        error: BaseException | None = None
        with self._model_lock:
            self._detach_retired()
            try:
                self._model.add_adapter(slot.name, pooled.spec, arrays=pooled.arrays)
                self._model.set_requires_grad(slot.name, False)
                self._model.eval()
            except BaseException as exc:
                error = exc
                if slot.name in self._model.adapters:
                    self._model.delete_adapter(slot.name)
        if error is not None:
            self._fail(slot, error)
            raise error
        with self._cv:
            self._stats = replace(
                self._stats,
                loads=self._stats.loads + 1,
                load_seconds=self._stats.load_seconds + time.perf_counter() - start,
            )
            slot.ready.set()
            self._cv.notify_all()

    def _fail(self, slot: _Slot, exc: BaseException) -> None:
        """Free a slot whose load failed; its waiters raise ``exc``. The model may still hold evicted adapters:
        they are detached now, so that the freed slot cannot let the model exceed K."""
        with self._model_lock:
            self._detach_retired()
        with self._cv:
            slot.error = exc
            if self._slots.get(slot.name) is slot:
                del self._slots[slot.name]
            self._stats = replace(self._stats, failed_loads=self._stats.failed_loads + 1)
            slot.ready.set()
            self._cv.notify_all()

    def _detach_retired(self) -> None:
        """Detach every evicted adapter still attached (the caller holds the model lock)."""
        with self._cv:
            retiring, self._retiring = self._retiring, []
        for name in retiring:
            self._model.delete_adapter(name)

    def _release(self, held: Iterable[_Slot]) -> None:
        with self._cv:
            for slot in held:
                slot.users -= 1
            self._cv.notify_all()

    def __repr__(self) -> str:
        return f"AdapterPool(max_loaded={self._max}, loaded={self.loaded}, pinned={sorted(self.pinned)})"


def _rows(adapter_names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise PeftdeclError("adapter_names must be a list of adapter names, one per batch row")
    return tuple(adapter_names)
