"""A bounded YAML reader for specs: JSON-compatible values only, with alias expansion counted before building.

PyYAML's safe loader still builds ``set``, ``bytes`` and ``datetime`` values (``!!set``, ``!!binary``, unquoted
dates), follows recursive aliases, and expands a "billion laughs" document into 10^8 values. Here:

- a YAML document is at most ``MAX_YAML_CHARS`` long (YAML parses far slower than JSON);
- the event stream is scanned once, iteratively, and refused past ``MAX_DEPTH`` levels or ``MAX_NODES`` nodes
  before anything is composed (so neither Python's recursion limit nor libyaml's C recursion is reached);
- the composed node graph is walked once, sharing-aware, and refused if an alias refers to itself or if the
  fully expanded document would hold more than ``MAX_NODES`` values; only then are Python objects built;
- ``!!binary``, ``!!set``, ``!!omap``, ``!!pairs``, ``!!timestamp`` and every non-core tag are refused;
- unquoted dates stay strings (as in YAML 1.2's core schema) instead of becoming ``datetime.date``.
"""

from __future__ import annotations

from typing import NoReturn, Protocol

import yaml

from peftdecl._json import JsonValue
from peftdecl.errors import SpecError
from peftdecl.spec.limits import MAX_DEPTH, MAX_NODES, MAX_YAML_CHARS

_REFUSED_TAGS = ("binary", "set", "omap", "pairs", "timestamp")


_RESOLVERS = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with a nesting bound while composing and JSON-only constructors (pure Python)."""

    yaml_implicit_resolvers = _RESOLVERS

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _RefusedError(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _RefusedError(Exception):
    """Raised inside the loader; turned into a SpecError naming the source."""


def _refuse(loader: yaml.SafeLoader | yaml.CSafeLoader, node: yaml.Node) -> NoReturn:
    raise _RefusedError(
        f"YAML tag {node.tag!r} (line {node.start_mark.line + 1}) is not allowed in a spec; "
        "use plain strings, numbers, booleans, null, lists and mappings"
    )


_LOADERS: list[type[yaml.SafeLoader] | type[yaml.CSafeLoader]] = [_BoundedLoader]
if getattr(yaml, "__with_libyaml__", False):
    # libyaml scans and composes ~10x faster; its composer recurses in C, so the event pre-scan in load_yaml
    # bounds the depth before it runs

    class _CBoundedLoader(yaml.CSafeLoader):
        """libyaml's safe loader with the same resolvers and constructors."""

        yaml_implicit_resolvers = _RESOLVERS

    _LOADERS.insert(0, _CBoundedLoader)

for _loader in _LOADERS:
    for _tag in _REFUSED_TAGS:
        _loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse)
    _loader.add_constructor(None, _refuse)
_LOADER = _LOADERS[0]


def prescan(text: str, loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = _BoundedLoader) -> int:
    """Walk the YAML event stream once (iteratively) and refuse nesting past MAX_DEPTH or more than MAX_NODES
    nodes written out, before anything is composed; returns the node count."""
    depth = count = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.NodeEvent):
            count += 1
            if count > MAX_NODES:
                raise _RefusedError(f"more than {MAX_NODES} values")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _RefusedError(f"nested deeper than {MAX_DEPTH} levels{_line(event.start_mark)}")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return count


def expanded_size(root: yaml.Node) -> int:
    """Number of values the node graph expands to (aliases counted at every use); raises on a cycle or when the
    count passes ``MAX_NODES``. Iterative and memoised, so a billion-laughs graph is counted in O(nodes)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            open_nodes.discard(key)
            total = 1 + sum(sizes[id(child)] for child in children)
            if total > MAX_NODES:
                raise _RefusedError(f"expands to more than {MAX_NODES} values (YAML aliases)")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _RefusedError(f"recursive YAML alias (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise _RefusedError(f"recursive YAML alias (line {child.start_mark.line + 1})")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str, origin: str | None) -> JsonValue:
    """Parse one YAML document within the bounds above; every failure is a SpecError naming ``origin``."""
    if len(text) > MAX_YAML_CHARS:
        raise SpecError(
            [("$", f"YAML spec of {len(text)} characters; at most {MAX_YAML_CHARS} (JSON may be larger)")],
            origin,
        )
    loader = None
    try:
        prescan(text, _LOADER)
        loader = _LOADER(text)  # its reader refuses control characters such as NUL
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    except _RefusedError as exc:
        raise SpecError([("$", f"not a valid spec: {exc}")], origin) from None
    except yaml.YAMLError as exc:
        raise SpecError([("$", f"not valid YAML: {_one_line(exc)}")], origin) from None
    except (ValueError, TypeError, RecursionError) as exc:
        # int() past Python's 4300-digit limit, an unhashable key, ...: all faults of the document
        raise SpecError([("$", f"not valid YAML: {type(exc).__name__}: {str(exc)[:200]}")], origin) from None
    finally:
        if loader is not None:
            loader.dispose()


class _Mark(Protocol):
    """Where an event starts (PyYAML's Python and libyaml marks alike)."""

    @property
    def line(self) -> int: ...


def _line(mark: _Mark | None) -> str:
    return "" if mark is None else f" (line {mark.line + 1})"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."
