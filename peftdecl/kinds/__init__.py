"""The kind registry: each adapter kind is declared once, as a :class:`KindDecl`, and every table derives from it.

Kinds come from three places, in this order: the built-ins (:mod:`peftdecl.kinds.builtin`, HF PEFT's order),
the entry-point group ``peftdecl.kinds`` (an entry point's value is a KindDecl, or a callable returning one or
several), and :func:`register_kind` at runtime. The spec union, the JSON schemas, the HF file markers,
``peftdecl inspect``, each backend's Capabilities and ops lookup, the capabilities page and the test table all
read :func:`kinds`, so adding a kind touches no file of peftdecl (see ``docs/adding-a-kind.md``).

Derived tables are cached by :func:`version`, which changes whenever the registry does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

from peftdecl.errors import BackendError
from peftdecl.kinds._decl import COMPOSITIONS, Composition, KindDecl, RankReader, Shapes, no_rank, resolve
from peftdecl.spec._base import SpecBase

ENTRY_POINT_GROUP = "peftdecl.kinds"

_registered: dict[str, KindDecl] = {}
_from_entry_points: dict[str, KindDecl] | None = None
_version = 0
_cache: dict[str, tuple[int, object]] = {}

T = TypeVar("T")


def version() -> int:
    """A number that changes whenever a kind is registered, unregistered or entry points are re-read."""
    return _version


def cached(key: str, build: Callable[[], T]) -> T:
    """``build()``, computed again only when the registry changed since the last call with ``key``."""
    hit = _cache.get(key)
    if hit is not None and hit[0] == _version:
        return hit[1]  # type: ignore[return-value]
    value = build()
    _cache[key] = (_version, value)
    return value


def _changed() -> None:
    global _version
    _version += 1


def _builtins() -> dict[str, KindDecl]:
    from peftdecl.kinds.builtin import BUILTIN_KINDS

    return {decl.name: decl for decl in BUILTIN_KINDS}


def _entry_point_kinds() -> dict[str, KindDecl]:
    global _from_entry_points
    if _from_entry_points is None:
        found: dict[str, KindDecl] = {}
        try:
            points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        except Exception:  # a broken distribution must not hide the built-in kinds
            points = []
        builtin = _builtins()
        for point in points:
            try:
                for decl in _as_decls(point.load()):
                    if builtin.get(decl.name) is decl:  # peftdecl's own entry point lists the built-ins
                        continue
                    if decl.name in builtin:
                        raise ValueError(f"kind {decl.name!r} is built in")
                    found[decl.name] = decl
            except Exception as exc:  # one broken plugin must not take the others down
                warnings.warn(
                    f"entry point {point.name!r} of group {ENTRY_POINT_GROUP!r} ({point.value}) was skipped: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _from_entry_points = found
    return _from_entry_points


def _as_decls(value: object) -> list[KindDecl]:
    if callable(value) and not isinstance(value, KindDecl):
        value = value()
    items = [value] if isinstance(value, KindDecl) else list(value)  # type: ignore[call-overload]
    if not all(isinstance(item, KindDecl) for item in items):
        raise TypeError("an entry point must give a KindDecl or a callable returning KindDecls")
    return items


def refresh() -> None:
    """Read the ``peftdecl.kinds`` entry points again (after installing a plugin in a running process)."""
    global _from_entry_points
    _from_entry_points = None
    _changed()


def _table() -> dict[str, KindDecl]:
    # the registry's own (cached, not to be mutated) table; kinds() hands out copies
    return cached("kinds", lambda: {**_builtins(), **_entry_point_kinds(), **_registered})


def kinds() -> dict[str, KindDecl]:
    """Every kind by execution name: built-ins in HF PEFT's order, then entry points, then registered ones."""
    return dict(_table())


def register_kind(decl: KindDecl, *, replace: bool = False) -> None:
    """Add ``decl`` to the registry (``replace=True`` to redeclare a kind of the same name).

    A kind sharing another kind's ``peft_type`` must share its ``spec_class`` (one Struct per ``peft_type``)."""
    current = _table()
    if decl.name in current and not replace:
        raise ValueError(f"kind {decl.name!r} is already registered; pass replace=True to redeclare it")
    for other in current.values():
        if (
            other.name != decl.name
            and other.peft_type == decl.peft_type
            and other.spec_class is not decl.spec_class
        ):
            raise ValueError(
                f"kind {decl.name!r}: peft_type {decl.peft_type!r} belongs to {other.spec_class.__name__} "
                f"(kind {other.name!r}), not {decl.spec_class.__name__}"
            )
    _registered[decl.name] = decl
    _changed()


def unregister_kind(name: str) -> None:
    """Remove a kind added by :func:`register_kind` (built-in and entry-point kinds cannot be removed)."""
    if name not in _registered:
        raise KeyError(f"kind {name!r} was not added by register_kind")
    del _registered[name]
    _changed()


def get_kind(name: str) -> KindDecl:
    """The declaration of execution kind ``name``; KeyError naming the known kinds."""
    found = _table().get(name)
    if found is None:
        raise KeyError(f"no adapter kind {name!r}; known kinds: {', '.join(_table())}")
    return found


def kinds_for_peft_type(peft_type: str) -> list[KindDecl]:
    """The kinds whose spec has this ``peft_type`` (``LORA``: lora and dora)."""
    return [decl for decl in _table().values() if decl.peft_type == peft_type]


def spec_types() -> dict[str, type[SpecBase]]:
    """``peft_type`` -> spec Struct, for every kind (the first kind of a shared ``peft_type`` names it)."""

    def build() -> dict[str, type[SpecBase]]:
        found: dict[str, type[SpecBase]] = {}
        for decl in _table().values():
            found.setdefault(decl.peft_type, decl.spec_class)
        return found

    return dict(cached("spec_types", build))


def ops_for(kind: str, backend: str) -> object:
    """The ops object of ``kind`` on ``backend``, imported on first use; BackendError when it declares none.

    Called on every adapted layer's forward, so a repeat call is one dictionary lookup."""
    key = f"ops:{backend}:{kind}"
    hit = _cache.get(key)
    if hit is not None and hit[0] == _version:
        return hit[1]
    decl = _table().get(kind)
    if decl is None:
        known = ", ".join(_table())
        raise BackendError(f"the {backend} backend cannot run kind {kind!r}: no such kind ({known})")
    target = decl.ops.get(backend)
    if target is None:
        declared = ", ".join(decl.ops) or "none"
        raise BackendError(f"kind {kind!r} declares no ops for the {backend} backend (it has: {declared})")
    return cached(key, lambda: resolve(target, f"kind {kind!r} ops for {backend}"))


def _present(target: str | object) -> bool:
    # a "module:ATTR" whose module is not there (not written yet, or not installed) is not offered
    if not isinstance(target, str):
        return True
    try:
        return importlib.util.find_spec(target.partition(":")[0]) is not None
    except (ImportError, ValueError):
        return False


def backend_kinds(backend: str, layer_types: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Kind -> its layer types that are also in ``layer_types`` (those the backend wraps), for every kind that
    declares ops for ``backend``. Nothing heavy is imported: a module path is only looked up."""
    wrapped = tuple(layer_types)

    def build() -> dict[str, tuple[str, ...]]:
        return {
            decl.name: tuple(t for t in decl.layer_types if t in wrapped)
            for decl in _table().values()
            if backend in decl.ops and _present(decl.ops[backend])
        }

    return dict(cached(f"backend_kinds:{backend}:{','.join(wrapped)}", build))


class BackendKinds(Mapping[str, tuple[str, ...]]):
    """A backend's ``Capabilities.kinds``, read live from the registry: kind -> layer types it runs on."""

    def __init__(self, backend: str, layer_types: Sequence[str]) -> None:
        self.backend = backend
        self.layer_types = tuple(layer_types)

    def _table(self) -> dict[str, tuple[str, ...]]:
        return backend_kinds(self.backend, self.layer_types)

    def __getitem__(self, kind: str) -> tuple[str, ...]:
        return self._table()[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"BackendKinds({self.backend!r}, {self._table()!r})"


class KindNames(Sequence[str]):
    """A live tuple of a backend's kind names that pass ``test`` (e.g. the additive ones, for mixed batches)."""

    def __init__(self, table: Mapping[str, tuple[str, ...]], test: Callable[[KindDecl], bool]) -> None:
        self._table = table
        self._test = test

    def _names(self) -> tuple[str, ...]:
        every = _table()
        return tuple(k for k in self._table if k in every and self._test(every[k]))

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


def additive_kinds(table: Mapping[str, tuple[str, ...]]) -> KindNames:
    """The additive kinds of a backend's kind table (they run in mixed batches), kept current."""
    return KindNames(table, lambda decl: decl.additive)


def layer_kinds(table: Mapping[str, tuple[str, ...]]) -> KindNames:
    """The layer-level kinds of a backend's kind table (prompt learning excluded), kept current."""
    return KindNames(table, lambda decl: not decl.model_level)


__all__ = [
    "COMPOSITIONS",
    "ENTRY_POINT_GROUP",
    "BackendKinds",
    "Composition",
    "KindDecl",
    "KindNames",
    "RankReader",
    "Shapes",
    "additive_kinds",
    "backend_kinds",
    "get_kind",
    "kinds",
    "kinds_for_peft_type",
    "layer_kinds",
    "no_rank",
    "ops_for",
    "refresh",
    "register_kind",
    "spec_types",
    "unregister_kind",
    "version",
]
